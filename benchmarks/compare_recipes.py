"""Recipes side by side at equal steps: SUPERB x-vector vs ECAPA-TDNN, with and without augmentation,
raw cosine and AS-norm, several seeds, on the demo corpus and on real speech (real-mini).

    python benchmarks/compare_recipes.py --work /tmp/recipes --steps 300 --seeds 0 1

Every run is `train_asv.py --config configs/demo.yaml` plus the overrides below, so each row is a
command a user can re-run; the test EER is the checkpoint chosen on validation speakers.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL_MINI = ROOT.parent / "shared" / "data" / "real-mini"
SMALL_ECAPA = ["downstream.name=ecapa", "downstream.channels=128", "downstream.embed_dim=128"]
AUGMENT = ["augment.specaug_prob=0.5", "augment.speed_prob=0.5"]  # no MUSAN/RIR folders on CPU machines
RECIPES = {
    "x-vector (SUPERB TDNN)": [],
    "ECAPA-TDNN": SMALL_ECAPA,
    "ECAPA-TDNN + augmentation": SMALL_ECAPA + AUGMENT,
}


def run(cmd):
    result = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{result.stderr[-2000:]}")
    return result.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work", default="/tmp/recipes", help="data and run folders")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (equal for all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one run per seed and recipe")
    parser.add_argument("--corpora", nargs="+", default=["demo", "real-mini"], choices=["demo", "real-mini"],
                        help="synthetic demo and/or ../shared/data/real-mini")
    args = parser.parse_args()
    work = Path(args.work)
    data = {"demo": work / "demo", "real-mini": work / "real-mini"}
    if "demo" in args.corpora and not (data["demo"] / "utterances.csv").exists():
        run(["prepare_voxceleb.py", "--demo", "--out", data["demo"]])
    if "real-mini" in args.corpora and not (data["real-mini"] / "utterances.csv").exists():
        run(["prepare_voxceleb.py", "--corpus", REAL_MINI, "--out", data["real-mini"], "--test-speakers", "5",
             "--valid-speakers", "2"])

    rows = ["| corpus | recipe | seeds | EER % (mean ± sd) | AS-norm EER % | minDCF 0.01 | AS-norm minDCF 0.01 |",
            "|---|---|---|---|---|---|---|"]
    for corpus in args.corpora:
        for name, overrides in RECIPES.items():
            found = []
            for seed in args.seeds:
                exp = work / "exp" / corpus / f"{name.split()[0]}{'-aug' if 'aug' in name else ''}-seed{seed}"
                run(["train_asv.py", "--config", "configs/demo.yaml", f"data.dir={data[corpus]}", f"exp_dir={exp}",
                     f"train.total_steps={args.steps}", f"train.seed={seed}", "train.eval_step=100",
                     "train.save_step=100", "train.log_step=100", "score.asnorm=true", "score.top_k=100",
                     *overrides])
                raw = json.loads((exp / "best" / "eval" / "test" / "metrics.json").read_text())
                norm = json.loads((exp / "best" / "eval" / "test" / "metrics_asnorm.json").read_text())
                found.append((raw["eer"], norm["eer"], raw["min_dcf_0.01"], norm["min_dcf_0.01"]))
                print(f"{corpus} | {name} | seed {seed} | EER {raw['eer']:.2f}% | AS-norm {norm['eer']:.2f}%",
                      flush=True)
            v = np.array(found)
            rows.append(f"| {corpus} | {name} | {len(found)} | {v[:, 0].mean():.2f} ± {v[:, 0].std():.2f} | "
                        f"{v[:, 1].mean():.2f} ± {v[:, 1].std():.2f} | {v[:, 2].mean():.4f} | {v[:, 3].mean():.4f} |")
    print(f"\n{args.steps} steps per run; overrides: ECAPA {' '.join(SMALL_ECAPA)}; augmentation {' '.join(AUGMENT)}\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
