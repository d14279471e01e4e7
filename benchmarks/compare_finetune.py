"""Fine-tuning an SSL upstream, side by side: frozen vs joint vs LoRA (vs joint with gradient checkpointing),
seconds per optimizer step and peak memory, on a random-weight WavLM of a small size.

    python benchmarks/compare_finetune.py --steps 6 --layers 4 --dim 256 --secs 3 --batch 4 --threads 1

Each variant runs in a subprocess of its own (this script with --variant), so its peak resident memory
(ru_maxrss of that process: model, optimizer state, activations kept for backward) is its own. A step is
asv.train's train_step (forward, backward, clip, optimizer step) on random waveforms, built by
asv.train.build_parts from configs/demo.yaml plus the variant's overrides (an x-vector downstream); the
first step (allocations, lazy init) is left out of the time. Prints a Markdown table with the ratios to
the frozen upstream, and the command that made it.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from common import ROOT

VARIANTS = {  # name: overrides on top of a trainable/frozen random WavLM
    "frozen": ["upstream.trainable=false"],
    "joint": ["upstream.trainable=true"],
    "joint + grad checkpointing": ["upstream.trainable=true", "upstream.grad_checkpointing=true"],
    "LoRA rank 8": ["upstream.trainable=true", "upstream.lora_rank=8"],
}


def one_variant(args) -> dict:
    import torch
    from accelerate import Accelerator

    from asv.config import load_config
    from asv.train import build_parts, prepare, train_step

    torch.set_num_threads(args.threads)
    arch = (f"{{encoder_num_layers: {args.layers}, encoder_embed_dim: {args.dim}, encoder_num_heads: 4, "
            f"encoder_ff_interm_features: {4 * args.dim}}}")
    cfg = load_config(str(ROOT / "configs" / "demo.yaml"), [
        "upstream.name=wavlm_base_plus", "upstream.n_mels=80", "upstream.random_init=true", f"upstream.arch={arch}",
        "train.log_with=none", *VARIANTS[args.variant]])
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    parts = build_parts(cfg, num_classes=20)
    prepare(accelerator, parts)
    for m in parts.trained:
        m.train()
    n = int(args.secs * 16000)
    wavs, lengths = torch.randn(args.batch, n), torch.full((args.batch,), n)
    labels = torch.arange(args.batch) % 20
    times = []
    for _ in range(args.steps):
        tic = time.perf_counter()
        train_step(accelerator, parts, wavs, lengths, labels, 5.0)
        times.append(time.perf_counter() - tic)
    learning = sum(p.numel() for p in parts.params)
    steady = times[1:]
    return {"s_per_step": sum(steady) / len(steady), "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trained_m": learning / 1e6}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per variant (the first is not timed)")
    parser.add_argument("--layers", type=int, default=4, help="transformer layers of the random WavLM")
    parser.add_argument("--dim", type=int, default=256, help="its width")
    parser.add_argument("--secs", type=float, default=3.0, help="crop length")
    parser.add_argument("--batch", type=int, default=4, help="crops per step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # one subprocess's own
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is not timed)")
    if args.variant:
        print(json.dumps(one_variant(args)))
        return
    passed = [a for a in sys.argv[1:]]
    rows = {}
    for name in VARIANTS:
        out = subprocess.run([sys.executable, __file__, *passed, "--variant", name], cwd=ROOT, capture_output=True,
                             text=True)
        if out.returncode != 0:
            sys.exit(f"{name}: failed\n{out.stderr[-2000:]}")
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name}: {rows[name]}", flush=True)
    base = rows["frozen"]
    print(f"\n`python benchmarks/compare_finetune.py {' '.join(passed)}` (random WavLM, {args.layers} layers x "
          f"{args.dim}, batch {args.batch} x {args.secs:g} s, {args.threads} thread(s))\n")
    print("| upstream | parameters trained (M) | s / step | x frozen | peak RSS (MB) | x frozen |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['trained_m']:.2f} | {r['s_per_step']:.3f} | {r['s_per_step'] / base['s_per_step']:.2f} "
              f"| {r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb']:.2f} |")


if __name__ == "__main__":
    main()
