"""Filterbank backbones at equal CPU time on real speech (real-mini): ResNet34 and CAM++ against ECAPA-TDNN.

    nice -n 10 python benchmarks/compare_backbones.py --work /tmp/backbones --budget 150

Each backbone is `train_asv.py --config configs/demo.yaml` with its downstream section replaced (written to
WORK/configs/, a downstream section belongs to one architecture) and 80 log mel bands, on real-mini prepared
with 5 test and 2 validation speakers. A probe run of --probe steps measures its CPU seconds per step; the
real run then gets as many steps as fit in --budget CPU seconds of training: CPU seconds per step are the
difference of a 1-step and a --probe-step run over the extra steps (start-up, validation and saving cancel
out). The test EER is the run's last checkpoint (validated once, at the end).

The budget is CPU time (user + system) of the training process and its loader workers (getrusage of the
waited-for children), not wall time: on a machine shared with other jobs the wall time of a step depends on
how many of them run (they take the cores); its CPU time should not, but on the shared 2-core VM of
benchmarks/README.md it still rose 2-9x under load (a step of CAM++: 8.8 CPU s loaded, 0.99 quiet), most
likely the spinning of torch's two threads waiting for each other, which counts as CPU time. So equal CPU
budgets are equal only on a quiet machine or with one thread; the wall seconds are printed beside the CPU
seconds to show how far the two differ.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import REAL_MINI, ROOT

BACKBONES = {  # name: downstream section (the recipes' sizes: configs/resnet34.yaml, cam_plus.yaml, strong's ECAPA at 512)
    "ECAPA-TDNN (C=512)": {"name": "ecapa", "channels": 512, "embed_dim": 192},
    "ResNet34 (32 channels)": {"name": "resnet34", "channels": 32, "embed_dim": 256},
    "CAM++": {"name": "campplus", "embed_dim": 512},
}


def child_cpu() -> float:
    """CPU seconds (user + system) of this process's children that have finished, their own children included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(cmd):
    result = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{result.stderr[-2000:]}")
    return result.stdout


def config(work: Path, downstream: dict) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["downstream"], cfg["upstream"] = downstream, {"name": "logmel", "n_mels": 80}
    path = work / "configs" / f"{downstream['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train(cfg: Path, data: Path, exp: Path, steps: int, batch: int, test: bool) -> tuple[float, float]:
    """One run; returns its (CPU seconds, wall seconds). Logged every step, validated and saved at the end only."""
    cpu, tic = child_cpu(), time.perf_counter()
    run(["train_asv.py", "--config", cfg, f"data.dir={data}", f"exp_dir={exp}", f"train.total_steps={steps}",
         f"data.batch_size={batch}", f"train.eval_step={steps}", f"train.save_step={steps}", "train.log_step=1",
         "train.log_with=none", "num_workers=1", f"train.test_after_train={'true' if test else 'false'}"])
    return child_cpu() - cpu, time.perf_counter() - tic


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work", default="/tmp/backbones", help="data and run folders")
    parser.add_argument("--budget", type=float, default=150.0, help="training CPU seconds per backbone")
    parser.add_argument("--probe", type=int, default=4, help="steps of the timing probe")
    parser.add_argument("--batch", type=int, default=16, help="2 s crops per step")
    parser.add_argument("--backbones", nargs="+", choices=[d["name"] for d in BACKBONES.values()],
                        default=[d["name"] for d in BACKBONES.values()], help="which of them to run")
    args = parser.parse_args()
    work = Path(args.work)
    data = work / "real-mini"
    run(["prepare_voxceleb.py", "--corpus", REAL_MINI, "--out", data, "--test-speakers", "5", "--valid-speakers", "2"])
    rows = []
    for name, downstream in BACKBONES.items():
        if downstream["name"] not in args.backbones:
            continue
        cfg = config(work, downstream)
        (one, one_wall) = train(cfg, data, work / downstream["name"] / "probe1", 1, args.batch, test=False)
        (more, more_wall) = train(cfg, data, work / downstream["name"] / "probe", args.probe, args.batch, test=False)
        probe = max(more - one, 1e-3) / (args.probe - 1)
        probe_wall = max(more_wall - one_wall, 1e-3) / (args.probe - 1)
        steps = max(1, int(args.budget / probe))
        cpu, wall = train(cfg, data, work / downstream["name"] / "run", steps, args.batch, test=True)
        test = json.loads((work / downstream["name"] / "run" / "best" / "eval" / "test" / "metrics.json").read_text())
        rows.append((name, probe, probe_wall, steps, cpu, wall, test["eer"], test["min_dcf_0.01"]))
        print(rows[-1], flush=True)
    print(f"\n`python benchmarks/compare_backbones.py --budget {args.budget:g} --probe {args.probe} --batch {args.batch}`"
          " (real-mini, 5 test speakers; budget in CPU seconds)\n")
    print("| backbone | CPU s / step (probe) | wall s / step (probe) | steps in budget | run CPU s | run wall s "
          "(both incl. start-up, eval) | test EER % | minDCF0.01 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, probe, probe_wall, steps, cpu, wall, eer, dcf in rows:
        print(f"| {name} | {probe:.2f} | {probe_wall:.2f} | {steps} | {cpu:.0f} | {wall:.0f} | {eer:.2f} | {dcf:.4f} |")


if __name__ == "__main__":
    main()
