"""Recipes side by side at equal steps: the demo's BatchNorm x-vector vs ECAPA-TDNN, with and without
augmentation, raw cosine and AS-norm, several seeds, on the demo corpus and on real speech (real-mini).

    python benchmarks/compare_recipes.py --work /tmp/recipes --steps 300 --seeds 0 1

Every run is `train_asv.py --config <config>` plus the overrides below, so each row is a command a
user can re-run; the configs are configs/demo.yaml and, for ECAPA, a copy of it with an ECAPA
downstream section written to WORK/configs/ (a downstream section belongs to one architecture, so
`downstream.name=ecapa` on the command line cannot undo demo.yaml's x-vector keys). The test EER is
the checkpoint chosen on validation speakers.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from common import REAL_MINI, ROOT

SMALL_ECAPA = {"name": "ecapa", "channels": 128, "embed_dim": 128}
AUGMENT = ["augment.specaug_prob=0.5", "augment.speed_prob=0.5"]  # no MUSAN/RIR folders on CPU machines
RECIPES = {  # name: (downstream section replacing demo.yaml's, or None; overrides)
    "x-vector (BatchNorm TDNN, demo.yaml)": (None, []),
    "ECAPA-TDNN": (SMALL_ECAPA, []),
    "ECAPA-TDNN + augmentation": (SMALL_ECAPA, AUGMENT),
}


def run(cmd):
    result = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{result.stderr[-2000:]}")
    return result.stdout


def recipe_config(work: Path, downstream: dict | None) -> Path:
    """configs/demo.yaml, or a copy of it under WORK/configs with another downstream section."""
    demo = ROOT / "configs" / "demo.yaml"
    if downstream is None:
        return demo
    cfg = yaml.safe_load(demo.read_text())
    cfg["downstream"] = downstream
    path = work / "configs" / f"demo_{downstream['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def prepare(work: Path, corpora: list[str]) -> dict[str, Path]:
    """The demo corpus and/or real-mini, prepared once into WORK (a re-run with the same arguments is a no-op)."""
    data = {"demo": work / "demo", "real-mini": work / "real-mini"}
    if "demo" in corpora:
        run(["prepare_voxceleb.py", "--demo", "--out", data["demo"]])
    if "real-mini" in corpora:
        if not REAL_MINI.is_dir():
            sys.exit(f"{REAL_MINI}: real speech folder not found (the shared data sits in ../shared/data beside the "
                     "checkout; or pass --corpora demo)")
        run(["prepare_voxceleb.py", "--corpus", REAL_MINI, "--out", data["real-mini"], "--test-speakers", "5",
             "--valid-speakers", "2"])
    return data


def train_and_read(config: Path, data: Path, exp: Path, steps: int, seed: int, overrides: list[str]) -> tuple:
    """One run; (EER, AS-norm EER, minDCF 0.01, AS-norm minDCF 0.01) of its best checkpoint on the test list."""
    run(["train_asv.py", "--config", config, f"data.dir={data}", f"exp_dir={exp}", f"train.total_steps={steps}",
         f"train.seed={seed}", "train.eval_step=100", "train.save_step=100", "train.log_step=100",
         "score.asnorm=true", "score.top_k=100", *overrides])
    raw = json.loads((exp / "best" / "eval" / "test" / "metrics.json").read_text())
    norm = json.loads((exp / "best" / "eval" / "test" / "metrics_asnorm.json").read_text())
    return raw["eer"], norm["eer"], raw["min_dcf_0.01"], norm["min_dcf_0.01"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work", default="/tmp/recipes", help="data and run folders")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (equal for all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one run per seed and recipe")
    parser.add_argument("--corpora", nargs="+", default=["demo", "real-mini"], choices=["demo", "real-mini"],
                        help="synthetic demo and/or ../shared/data/real-mini")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    data = prepare(work, args.corpora)

    rows = ["| corpus | recipe | seeds | EER % (mean ± sd) | AS-norm EER % | minDCF 0.01 | AS-norm minDCF 0.01 |",
            "|---|---|---|---|---|---|---|"]
    for corpus in args.corpora:
        for name, (downstream, overrides) in RECIPES.items():
            config, found = recipe_config(work, downstream), []
            for seed in args.seeds:
                exp = work / "exp" / corpus / f"{name.split()[0]}{'-aug' if 'aug' in name else ''}-seed{seed}"
                found.append(train_and_read(config, data[corpus], exp, args.steps, seed, overrides))
                print(f"{corpus} | {name} | seed {seed} | EER {found[-1][0]:.2f}% | AS-norm {found[-1][1]:.2f}%",
                      flush=True)
            v = np.array(found)
            rows.append(f"| {corpus} | {name} | {len(found)} | {v[:, 0].mean():.2f} ± {v[:, 0].std():.2f} | "
                        f"{v[:, 1].mean():.2f} ± {v[:, 1].std():.2f} | {v[:, 2].mean():.4f} | {v[:, 3].mean():.4f} |")
    print(f"\n{args.steps} steps per run; ECAPA: downstream {SMALL_ECAPA}; augmentation {' '.join(AUGMENT)}\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
