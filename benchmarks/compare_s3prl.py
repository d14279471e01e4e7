"""Side by side with the real s3prl 0.4.18 SuperbASV: the SUPERB recipe (configs/base.yaml, fbank upstream)
against s3prl's own, on the same files, trials, steps and seeds, in one run.

    python benchmarks/compare_s3prl.py --work /tmp/cmp --corpora real-mini demo --steps 30 --seeds 0 1 2

Per corpus: our prepare_voxceleb.py output with --valid-speakers 0 (SUPERB trains on every non-test
speaker), and a view of it for the peer runner (../shared/peers/s3prl-run: wav/<spk>/<session>/<utt>.wav,
FLAC re-wrapped losslessly as WAV, and our test list with ids mapped to those files). Then, seed by
seed, s3prl and ours alternately (so machine load falls on both alike): train `--steps` optimizer
steps (10 x 5 utterances each), then test the final checkpoint. `--lr` runs both at another learning
rate as well (SUPERB's 1e-4 barely moves the loss in a few dozen steps). Each stage runs under
/usr/bin/time -v plus a 0.5 s sampler of the summed PSS of its process tree.

Prints, per corpus and recipe: training loss at each log step (mean +- sd over seeds), test EER and
minDCF, seconds per training step, each stage's wall time and peak memory, and the commands. Also
s3prl's trained weights tested by our evaluation: where the two test EERs differ, it says whether
training or testing makes the difference (the 8 kHz files of real-mini are upsampled by librosa's
soxr in s3prl and by torchaudio here, which moves a barely trained model's pooled EER).
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import ROOT, SHARED, peer_stages, peer_view, run_measured

PEER = SHARED / "peers" / "s3prl-run"


def prepare(corpus: str, work: Path) -> Path:
    """Our data folder for `corpus` (real-mini or demo), every non-test speaker training."""
    data = work / corpus / "data"
    source = ["--demo"] if corpus == "demo" else ["--corpus", str(SHARED / "data" / "real-mini"), "--test-speakers", "5"]
    if corpus != "demo" and not (SHARED / "data" / "real-mini").is_dir():
        sys.exit(f"{SHARED / 'data' / 'real-mini'} not found: the shared data sits in ../shared/data")
    subprocess.run([sys.executable, ROOT / "prepare_voxceleb.py", *source, "--out", data, "--valid-speakers", "0"],
                   check=True, stdout=subprocess.DEVNULL)
    return data


def peer_losses(log: Path) -> dict[int, float]:
    """{step: loss} from s3prl's stage-2 log ("train at step N" then "loss: X")."""
    losses, step = {}, None
    for line in open(log, errors="replace"):
        if m := re.search(r"train at step (\d+)", line):
            step = int(m[1])
        elif (m := re.search(r"\bloss: ([-\d.e+naninf]+)", line)) and step is not None:
            losses[step], step = float(m[1]), None
    return losses


def run_peer(work, corpus, view, trials, steps, seed, log_step, lr):
    name = f"{corpus}_s3prl_lr{lr:g}_seed{seed}"
    out = work / corpus / name
    extra = [] if lr == 1e-4 else ["--build_optimizer.conf.lr", str(lr)]
    env = {"FORCE": "1", "TRIALS": str(trials), "SEED": str(seed), "LOG_STEP": str(log_step), "NUM_WORKERS": "0"}
    r = run_measured(name, ["bash", PEER / "run_s3prl_asv.sh", view, out, steps, *extra], work / "logs", env,
                     cwd=ROOT, tag="compare")
    result = yaml.safe_load(open(out / "exp" / "evaluate" / "test_trial" / f"step_{steps}" / "result.yaml"))
    stages = peer_stages(out / "summary.txt")
    rate = re.findall(r"train: 100%.*?([\d.]+)(s/it|it/s)", (out / "logs" / "s3prl_stage2_train.log").read_text())
    per_step = float(rate[-1][0]) if rate and rate[-1][1] == "s/it" else 1 / float(rate[-1][0]) if rate else None
    train = stages.get("s3prl_stage2_train", (None, None))
    return {**r, "losses": peer_losses(out / "logs" / "s3prl_stage2_train.log"), "eer": 100 * result["EER"],
            "dcf": result["minDCF"], "per_step": per_step, "train_wall": train[0], "train_pss": train[1],
            "test_wall": stages.get("s3prl_stage3-4_test", (None,))[0],
            "test_pss": stages.get("s3prl_stage3-4_test", (None, None))[1]}


def run_ours(work, corpus, data, steps, seed, log_step, lr):
    name = f"{corpus}_ours_lr{lr:g}_seed{seed}"
    exp = work / corpus / name
    shutil.rmtree(exp, ignore_errors=True)  # a fresh run: train_asv.py would otherwise resume
    train = run_measured(f"{name}_train", [sys.executable, "train_asv.py", "--config", "configs/base.yaml",
                                           "upstream.name=fbank", f"data.dir={data}", f"exp_dir={exp}",
                                           f"train.total_steps={steps}", f"train.save_step={steps}",
                                           f"train.log_step={log_step}", f"train.seed={seed}", f"optim.lr={lr}",
                                           "train.test_after_train=false", "train.log_with=none", "num_workers=2"],
                         work / "logs", cwd=ROOT, tag="compare")
    test = run_measured(f"{name}_test", [sys.executable, "evaluate_asv.py", "--ckpt-dir", exp / f"step-{steps}"],
                        work / "logs", cwd=ROOT, tag="compare")
    log = (exp / "train.log").read_text()
    losses = {int(m[1]): float(m[2]) for m in re.finditer(r"^step (\d+) \| loss (\S+)", log, re.M)}
    speeds = [float(s) for s in re.findall(r"\| (\d+) crops/s", log)][1:]  # the first interval holds start-up
    m = json.loads((exp / f"step-{steps}" / "eval" / "test" / "metrics.json").read_text())
    return {**train, "losses": losses, "eer": m["eer"], "dcf": m["min_dcf_0.01"],
            "per_step": 50 / statistics.mean(speeds) if speeds else None, "train_wall": train["wall"],
            "train_pss": train["pss"], "test_wall": test["wall"], "test_pss": test["pss"]}


def cross_eval(work, peer_run: Path, ours_run: Path, steps: int) -> float:
    """s3prl's trained weights, tested by our evaluate_asv.py: the SuperbXvector state dict loads into our
    superb_xvector as it is (same names), in a checkpoint folder of a run with our config for the recipe.
    Tells training from testing apart when the two toolkits' test EERs differ."""
    import torch  # here: the rest of the script only drives subprocesses

    state = torch.load(peer_run / "exp" / "train" / f"step_{steps}" / "model" / "state_dict.pt", map_location="cpu",
                       weights_only=True)
    run = peer_run / "ours_eval"
    shutil.rmtree(run, ignore_errors=True)
    (run / f"step-{steps}").mkdir(parents=True)
    shutil.copy(ours_run / "config.yaml", run / "config.yaml")
    model = torch.load(ours_run / f"step-{steps}" / "model.pt", map_location="cpu", weights_only=True)
    model["encoder"] = {k: state[k] if k.startswith("downstream.") else v for k, v in model["encoder"].items()}
    torch.save(model, run / f"step-{steps}" / "model.pt")
    subprocess.run([sys.executable, "evaluate_asv.py", "--ckpt-dir", run / f"step-{steps}"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads((run / f"step-{steps}" / "eval" / "test" / "metrics.json").read_text())["eer"]


def spread(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def table(corpus, lr, runs):
    """Markdown rows for one corpus and lr: losses per log step, EER, speed, walls, memory."""
    peer, ours = runs["s3prl"], runs["ours"]
    steps = sorted(set(peer[0]["losses"]) & set(ours[0]["losses"]))
    lines = [f"\n### {corpus}, lr {lr:g} ({len(peer)} seeds)\n", "| | s3prl 0.4.18 | ours (configs/base.yaml) |",
             "|---|---|---|"]
    for step in steps:
        lines.append(f"| training loss, step {step} | {spread(r['losses'].get(step) for r in peer)} | "
                     f"{spread(r['losses'].get(step) for r in ours)} |")
    for key, label in [("eer", "test EER %"), ("cross_eer", "test EER % of s3prl's weights, tested by ours"),
                       ("dcf", "test minDCF 0.01"), ("per_step", "seconds per training step"),
                       ("train_wall", "training stage wall s"), ("test_wall", "test stage wall s"),
                       ("train_pss", "training peak PSS MB"), ("test_pss", "test peak PSS MB")]:
        lines.append(f"| {label} | {spread(r.get(key) for r in peer)} | {spread(r.get(key) for r in ours)} |")
    p, o = [r["per_step"] for r in peer if r["per_step"]], [r["per_step"] for r in ours if r["per_step"]]
    if p and o:
        lines.append(f"| speed-up per training step | | {statistics.mean(p) / statistics.mean(o):.1f}x |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cmp"), help="working folder (default: %(default)s)")
    ap.add_argument("--corpora", nargs="+", default=["real-mini", "demo"], choices=["real-mini", "demo"],
                    help="default: %(default)s")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default: %(default)s)")
    ap.add_argument("--log-step", type=int, default=5, help="loss logged every N steps (default: %(default)s)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: %(default)s")
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-4], help="learning rates, 1e-4 = SUPERB's "
                    "(default: %(default)s)")
    args = ap.parse_args()
    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    if not PEER.is_dir() or not Path("/usr/bin/time").is_file():
        sys.exit(f"needs the s3prl runner in {PEER} and GNU time (apt-get install time)")
    report = [f"s3prl 0.4.18 vs this toolkit, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs; "
              f"{' '.join(sys.argv)}"]
    for corpus in args.corpora:
        data = prepare(corpus, work)
        trials = peer_view(data, work / corpus / "peer_corpus")
        for lr in args.lr:
            runs = {"s3prl": [], "ours": []}
            for seed in args.seeds:
                runs["s3prl"].append(run_peer(work, corpus, work / corpus / "peer_corpus", trials, args.steps, seed,
                                              args.log_step, lr))
                runs["ours"].append(run_ours(work, corpus, data, args.steps, seed, args.log_step, lr))
                runs["s3prl"][-1]["cross_eer"] = cross_eval(work, work / corpus / f"{corpus}_s3prl_lr{lr:g}_seed{seed}",
                                                            work / corpus / f"{corpus}_ours_lr{lr:g}_seed{seed}",
                                                            args.steps)
            report += table(corpus, lr, runs)
            (work / f"runs_{corpus}_lr{lr:g}.json").write_text(json.dumps(runs, indent=1, default=str))
    text = "\n".join(report)
    (work / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
