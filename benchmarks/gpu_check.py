"""Does the GPU work as it should, through the code users run? One line per check:

  train <model> <precision>: optimizer steps/s of asv.train's step (build_parts, prepare, train_step) on
      batches already on the device (model only), peak memory, GPU utilisation; WavLM Base+ (frozen) + SUPERB
      x-vector at configs/base.yaml's 10 x 5 crops of 8 s, and ECAPA (configs/strong.yaml's sizes) on log-mel
      at 64 crops of 3 s; bf16 as train.mixed_precision=bf16 runs it (the AAM head in fp32 under autocast);
  loader: the real training loader (asv.data.train_loader: SUPERB's SoX effects, base.yaml's workers) prepared
      with the WavLM step: the share of the step spent waiting for batches;
  eval: audio seconds per second of asv.embed.embed on length-sorted batches and one file at a time;
  recipe: train_asv.py with configs/strong.yaml (bf16, ECAPA, sub-centre AAM-softmax, SpecAugment, speed
      perturbation) on 2 processes when the machine has 2 GPUs (the CPU smoke: 2 gloo processes, the same DDP
      path), validation every few steps, then the test list evaluated (AS-norm): global batch, valid and
      test EER, seconds per step;
  fp16: train_asv.py with train.mixed_precision=fp16 on a corpus with one speaker's files poisoned (samples
      of ~1e30: the loss overflows): the number of skipped steps, and whether the saved weights are finite;
  deterministic: train_asv.py twice with train.deterministic=true: whether the two runs' weights are equal
      bit for bit (docs/training.md says what holds with and without it).

    python benchmarks/gpu_check.py              # CUDA; without a GPU it prints one line and exits 0
    bash benchmarks/gpu_check.sh                # the same, from any directory
    python benchmarks/gpu_check.py --cpu-smoke  # every part at tiny sizes on the CPU, the same code paths

Not yet run on a GPU (none was lent to this project's sessions so far): its time there is unmeasured. Audio: a small synthetic corpus (asv.demo voices, --speakers x 12 files of 2-4 s)
written to a temporary folder and prepared with prepare_voxceleb.py (2 test and 2 validation speakers), so the
check needs no data set and no network. Weights: random (upstream.random_init).
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
from accelerate.state import AcceleratorState
from common import ROOT, GpuUtilisation

from asv.config import load_config
from asv.data import loader_workers, read_manifest, train_loader, trim_once
from asv.demo import make_demo_speaker
from asv.embed import build_models, embed, eval_loader
from asv.models import min_input_samples
from asv.train import build_parts, make_accelerator, prepare, train_step

# Sizes: the recipes' own on a GPU; tiny ones for --cpu-smoke (the same code paths).
FULL = dict(speakers=16, wavlm={}, xvector=[], ecapa=[], crop=8.0, batch=10, accumulate=5, ecapa_batch=64,
            ecapa_crop=3.0, steps=5, warmup=2, eval_batch_secs=600.0, fp16_steps=20, recipe_steps=40, eval_files=None,
            recipe=["data.batch_size=32"], demo_steps=20)
TINY_WAVLM = {"encoder_num_layers": 2, "encoder_embed_dim": 32, "encoder_num_heads": 2,
              "encoder_ff_interm_features": 64, "encoder_pos_conv_kernel": 8, "encoder_pos_conv_groups": 2,
              "extractor_conv_layer_config": [[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2}
SMOKE = dict(speakers=6, wavlm=TINY_WAVLM, xvector=["downstream.hidden_size=32", "downstream.aggregation_size=48",
                                                    "downstream.embed_dim=16"],
             ecapa=["downstream.channels=32", "downstream.embed_dim=16", "downstream.attention_dim=16"], crop=1.0,
             batch=2, accumulate=2, ecapa_batch=4, ecapa_crop=1.0, steps=1, warmup=1, eval_batch_secs=60.0,
             fp16_steps=4, recipe_steps=4, demo_steps=3, eval_files=12,
             recipe=["data.batch_size=4", "downstream.channels=32", "downstream.embed_dim=16",
                     "downstream.attention_dim=16", "upstream.arch=" + repr(TINY_WAVLM).replace("'", '"')])


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
                                                              "augment.noise_prob=0", "augment.rir_prob=0",
                                                              "augment.noise_dir=", "augment.rir_dir=",
                                                              *sizes["ecapa"]])
    return "logmel+ecapa", cfg


def accelerator_for(cfg, precision: str):
    """asv.train.make_accelerator at `precision`. Accelerate keeps one precision per process: the state of
    the part before is reset first (Accelerate's own tests do the same)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    cfg.train.mixed_precision = precision
    return make_accelerator(cfg)


def make_corpus(folder: Path, speakers: int) -> Path:
    """Synthetic voices written as a VoxCeleb-layout tree, prepared (2 test and 2 validation speakers)."""
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda s: make_demo_speaker(folder / "corpus", 0, s), range(speakers)))
    data = folder / "data"
    subprocess.run([sys.executable, str(ROOT / "prepare_voxceleb.py"), "--corpus", str(folder / "corpus"),
                    "--out", str(data), "--test-speakers", "2", "--valid-speakers", "2"], check=True,
                   stdout=subprocess.DEVNULL, cwd=ROOT)
    return data


def train_asv(data: Path, exp: Path, config: str, overrides: list[str], processes: int = 1, cpu: bool = False):
    """train_asv.py as a user runs it; 2 processes through torchrun (ACCELERATE_USE_CPU=1 on the CPU: gloo)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd = [*(launch if processes > 1 else [sys.executable]), "train_asv.py", "--config", config, f"data.dir={data}",
           f"exp_dir={exp}", "train.log_with=none", *overrides]
    env = {**os.environ, **({"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"} if cpu else {})}
    tic = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=False)  # failed() reports it
    return out, time.perf_counter() - tic


def failed(what: str, out) -> bool:
    if out.returncode != 0:
        print(f"{what}: FAILED (rc {out.returncode}): {(out.stderr.strip().splitlines() or [''])[-1]}", flush=True)
    return out.returncode != 0


# ---------------------------------------------------------------------------- the checks

def optimizer_steps(accelerator, parts, micro_batches, clip: float, steps: int):
    for _ in range(steps):
        for wavs, lengths, labels in micro_batches:
            train_step(accelerator, parts, wavs, lengths, labels, clip)


def check_training(name: str, sizes: dict, data: Path, device):
    """Model-only optimizer steps/s of asv.train's step in fp32 and bf16 on batches already on the device."""
    label, cfg = recipe(name, sizes, data)
    batch, crop = (sizes["batch"], sizes["crop"]) if name == "wavlm" else (sizes["ecapa_batch"], sizes["ecapa_crop"])
    cfg.train.gradient_accumulate = sizes["accumulate"] if name == "wavlm" else 1  # strong.yaml: no accumulation
    gen = torch.Generator().manual_seed(0)
    micro = [(0.1 * torch.randn(batch, int(crop * 16000), generator=gen), torch.full((batch,), int(crop * 16000)),
              torch.randint(0, 100, (batch,), generator=gen)) for _ in range(cfg.train.gradient_accumulate)]
    rates = {}
    for precision in ("no", "bf16"):
        accelerator = accelerator_for(cfg, precision)
        parts = build_parts(cfg, 100)
        prepare(accelerator, parts)
        on_device = [tuple(t.to(accelerator.device) for t in m) for m in micro]
        optimizer_steps(accelerator, parts, on_device, cfg.train.gradient_clipping, sizes["warmup"])
        sync(device)
        reset_peak(device)
        with GpuUtilisation(device) as util:
            tic = time.perf_counter()
            optimizer_steps(accelerator, parts, on_device, cfg.train.gradient_clipping, sizes["steps"])
            sync(device)
            rates[precision] = sizes["steps"] / (time.perf_counter() - tic)
        speed_up = f", {rates['bf16'] / rates['no']:.2f}x fp32" if precision == "bf16" else ""
        print(f"train {label} {'fp32' if precision == 'no' else precision}: {rates[precision]:.2f} steps/s{speed_up} "
              f"({batch} crops of {crop:g} s x {cfg.train.gradient_accumulate} accumulated, model only), "
              f"{peak_memory(device)}, {util.text()}", flush=True)
        del parts


def check_loader(sizes: dict, data: Path, device):
    """The real training loader, prepared with the WavLM fp32 step: the share of the step spent waiting for batches."""
    _, cfg = recipe("wavlm", sizes, data)
    cfg.data.batch_size, cfg.data.max_secs = sizes["batch"], sizes["crop"]
    cfg.train.gradient_accumulate = sizes["accumulate"]
    cfg.num_workers = loader_workers(cfg.num_workers)  # the count, for the figure's label
    utts = [u for u in read_manifest(str(data)) if u.split == "train"]
    speakers = sorted({u.speaker for u in utts})
    accelerator = accelerator_for(cfg, "no")
    # as train_asv.py: the effects once per data folder (effects.tsv), each example a span of its file
    d = cfg.data
    trims = trim_once(str(data), utts, d.sample_rate, cfg.num_workers, False) if d.effects == "superb" else None
    durations = [u.duration for u in utts] if trims is None else list(trims.kept / d.sample_rate)
    loader = train_loader(cfg, utts, [speakers.index(u.speaker) for u in utts], durations,
                          multiple=sizes["accumulate"], trims=trims)
    parts = build_parts(cfg, len(speakers))
    (loader,) = prepare(accelerator, parts, loader)
    it, waited = iter(loader), 0.0

    def step():
        nonlocal waited
        for _ in range(sizes["accumulate"]):
            tic = time.perf_counter()
            wavs, lengths, labels = next(it)
            waited += time.perf_counter() - tic
            train_step(accelerator, parts, wavs, lengths, labels, cfg.train.gradient_clipping)
        sync(device)  # train_asv.py waits once a step (the finite-gradient check)

    step()  # warm-up: worker start-up
    waited = 0.0
    with GpuUtilisation(device) as util:
        tic = time.perf_counter()
        for _ in range(sizes["steps"]):
            step()
        total = time.perf_counter() - tic
    print(f"loader wavlm_base_plus fp32: waiting for batches {100 * waited / total:.0f}% of the step "
          f"({waited / sizes['steps']:.2f} s of {total / sizes['steps']:.2f} s; {cfg.num_workers} workers, SoX effects), "
          f"{util.text()}", flush=True)


def check_eval(sizes: dict, data: Path, device):
    """asv.embed.embed on every file: length-sorted batches against one file at a time."""
    _, cfg = recipe("wavlm", sizes, data)
    accelerator = accelerator_for(cfg, "no")
    utts = read_manifest(str(data))[:sizes["eval_files"]]
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


def check_recipe(sizes: dict, data: Path, work: Path, device):
    """train_asv.py with configs/strong.yaml (bf16, AAM), validation, then the test list; 2 processes when
    there are 2 GPUs (on the CPU: 2 gloo processes, the DDP path of a multi-GPU run)."""
    processes = 2 if device.type == "cpu" or torch.cuda.device_count() >= 2 else 1
    steps = sizes["recipe_steps"]
    out, secs = train_asv(data, work / "exp_recipe", "configs/strong.yaml", [
        "upstream.random_init=true", "augment.noise_prob=0", "augment.rir_prob=0", "augment.noise_dir=",
        "augment.rir_dir=", f"train.total_steps={steps}",
        f"train.eval_step={steps // 2}", f"train.save_step={steps // 2}", f"train.log_step={steps // 2}",
        "scheduler.warmup_steps=2", "train.test_after_train=true", "num_workers=2", *sizes["recipe"]],
        processes, cpu=device.type == "cpu")
    what = f"recipe train_asv.py configs/strong.yaml bf16 x {processes} process(es)"
    if failed(what, out):
        return
    text = out.stdout + out.stderr
    batch = re.search(r"global batch .* = (\d+) utterances", text)
    valid = re.findall(r"step (\d+) \| valid EER (\S+)%", text)
    test = re.search(r"\| test \| EER (\S+)%.*AS-norm EER (\S+)%", text)
    print(f"{what}: {steps} steps, global batch {batch[1] if batch else '?'}, valid EER "
          f"{', '.join(f'{e}% (step {s})' for s, e in valid) or 'none'}, test EER {test[1] if test else '?'}% "
          f"(AS-norm {test[2] if test else '?'}%), {secs / steps:.2f} s/step with start-up and evaluation", flush=True)


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
    out, _ = train_asv(data, exp, "configs/demo.yaml", [
        "train.mixed_precision=fp16", f"train.total_steps={steps}", f"train.save_step={steps}", "train.log_step=1",
        "train.test_after_train=false", "data.batch_size=4", "num_workers=0"])
    if failed("fp16 train_asv.py", out):
        return
    skipped = len(re.findall(r"warning: step \d+ skipped", out.stdout + out.stderr))
    finite = all(torch.isfinite(t).all() for part in ("encoder", "head") for t in weights(exp, steps, part).values()
                 if t.is_floating_point())
    scaler = "grad scaler" if device.type == "cuda" else "no grad scaler on the CPU: train_asv.py's own guard"
    print(f"fp16 train_asv.py: {steps} steps, {skipped} skipped as non-finite ({files} files of speaker {speaker} "
          f"poisoned; {scaler}), weights finite: {'yes' if finite else 'NO'}", flush=True)


def weights(exp: Path, step: int, part: str = "encoder") -> dict:
    return torch.load(exp / f"step-{step}" / "model.pt", map_location="cpu", weights_only=True)[part]


def check_deterministic(sizes: dict, data: Path, work: Path):
    """The same short run twice with train.deterministic=true (SpecAugment on): equal weights, bit for bit?"""
    steps = sizes["demo_steps"]
    runs = []
    for i in range(2):
        out, _ = train_asv(data, work / f"exp_det{i}", "configs/demo.yaml", [
            "train.deterministic=true", "augment.specaug_prob=0.5", f"train.total_steps={steps}",
            f"train.save_step={steps}", f"train.log_step={steps}", "train.test_after_train=false",
            "data.batch_size=8", "num_workers=0"])
        if failed("deterministic train_asv.py", out):
            return
        runs.append(weights(work / f"exp_det{i}", steps))
    equal = all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    print(f"deterministic train_asv.py: 2 runs of {steps} steps with train.deterministic=true, weights bit for bit "
          f"equal: {'yes' if equal else 'NO'}", flush=True)


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
        check_recipe(sizes, data, Path(tmp), device)
        check_deterministic(sizes, data, Path(tmp))
        check_fp16(sizes, data, Path(tmp), device)  # last: it poisons a speaker's files
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
