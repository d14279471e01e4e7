"""The float32 linear layers of evaluation on this CPU: torch's F.linear (MKL's sgemm) against oneDNN's linear
(models/onednn.py, which evaluation uses on x86-64 CPUs), side by side in one run.

    python benchmarks/linear_kernels.py --threads 1

Shapes: a Base SSL transformer's projections (768 -> 2304 for q, k, v; 768 -> 3072 and back for the feed-forward)
and the SUPERB x-vector's projector, over 150 and 400 frames (3 and 8 s of audio). Prints GFLOP/s of each, their
ratio, and the largest difference between the two outputs relative to the float64 product's scale.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from asv.models.onednn import OneDNNLinear, available

SHAPES = [(768, 2304), (768, 3072), (3072, 768), (768, 512)]  # (in, out)


def seconds(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN builds its kernel for the shape on first use
    tic = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - tic) / repeats


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=type(
        "Formatter", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}))
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per kernel and shape")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not available():
        raise SystemExit("oneDNN's linear is not available here (an x86-64 CPU and a torch built with oneDNN)")
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}")
    print("| frames | in -> out | F.linear (MKL) GFLOP/s | oneDNN GFLOP/s | oneDNN / MKL | max diff / scale |")
    print("|---|---|---|---|---|---|")
    mode = OneDNNLinear()
    with torch.no_grad():
        for frames in (150, 400):
            for d_in, d_out in SHAPES:
                x, layer = torch.randn(1, frames, d_in), torch.nn.Linear(d_in, d_out)
                mkl = seconds(lambda: layer(x), args.repeats)
                with mode:
                    onednn = seconds(lambda: layer(x), args.repeats)
                    y = layer(x)
                exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())
                scale = (x.double().abs() @ layer.weight.double().abs().T).max()
                flops = 2 * frames * d_in * d_out / 1e9
                print(f"| {frames} | {d_in} -> {d_out} | {flops / mkl:.0f} | {flops / onednn:.0f} | {mkl / onednn:.2f}x "
                      f"| {((y.double() - exact).abs().max() / scale).item():.1e} |")


if __name__ == "__main__":
    main()
