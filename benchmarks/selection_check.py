"""Does the checkpoint chosen on validation speakers hold up on the test trials? A corpus treated as a user's.

    python benchmarks/selection_check.py --work /tmp/selection --seeds 0 1 2 --steps 400

Two corpora (--corpora): `full`, real-mini as it is (10-24 utterances per speaker), and `few`, the same speakers
with only their first 5 utterances (file links, sorted order), where the auto rule's validation list is small
(4 speakers, 40 target trials) and every checkpoint may tie at EER 0: then `best` is the averaged fallback
(asv.run.settle).

Prepares ../shared/data/real-mini with prepare_voxceleb.py's defaults (validation speakers held out by its
auto rule, every pair of their utterances a validation trial) except --test-speakers (default 5: the auto
rule's 10% is 2 speakers of 19, one LibriSpeech and one 8 kHz digit speaker, whose test EER swung from 11%
to 48% between neighbouring checkpoints of one run, too noisy to judge any choice), trains configs/demo.yaml's recipe once per
seed, keeping a checkpoint every --every steps, evaluates every checkpoint on the test list, and prints per
seed: the step `best` points at (ranked on validation), its test EER, and the lowest test EER of any
checkpoint (which no fair selection could know), the last checkpoint's, and the mean and spread of the
test EER over all checkpoints of the seed (how much the test figure moves from one checkpoint to the next),
then their means and spread over seeds. "averaged" is the mean of the last 3 checkpoints (evaluate_asv.py
--average), what the fallback would pick.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from common import REAL_MINI, ROOT

FEW_UTTERANCES = 5


def run(*args):
    subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def few_utterances_corpus(folder: Path) -> Path:
    """real-mini with each speaker's first FEW_UTTERANCES files (sorted paths), as links."""
    for speaker in sorted(p for p in REAL_MINI.iterdir() if p.is_dir()):
        files = sorted(f for f in speaker.rglob("*") if f.is_file())[:FEW_UTTERANCES]
        for f in files:
            link = folder / f.relative_to(REAL_MINI)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(f)
    return folder


def test_eer(folder: Path) -> float:
    return json.loads((folder / "eval" / "test" / "metrics.json").read_text())["eer"]


def one_seed(data: Path, work: Path, seed: int, steps: int, every: int) -> dict:
    exp = work / f"seed{seed}"
    run("train_asv.py", "--config", "configs/demo.yaml", f"data.dir={data}", f"exp_dir={exp}", f"train.seed={seed}",
        f"train.total_steps={steps}", f"train.eval_step={every}", f"train.save_step={every}", "train.keep_num_ckpts=0",
        "train.test_after_train=false", "train.log_with=none", "num_workers=1")
    ckpts = sorted(exp.glob("step-*"), key=lambda p: int(p.name[5:]))
    run("evaluate_asv.py", "--ckpt-dir", *ckpts)
    run("evaluate_asv.py", "--ckpt-dir", *ckpts[-3:], "--average", exp / "avg-last3")
    test = {int(p.name[5:]): test_eer(p) for p in ckpts}
    target = (exp / "best").resolve().name
    chosen = int(target[5:]) if target.startswith("step-") else target
    values = list(test.values())
    return {"chosen": chosen, "chosen_eer": test[chosen] if isinstance(chosen, int) else test_eer(exp / target),
            "best_on_test": min(test, key=test.get), "best_eer": min(values), "last_eer": test[max(test)],
            "avg_eer": test_eer(exp / "avg-last3"), "mean_eer": statistics.mean(values),
            "sd_eer": statistics.stdev(values) if len(values) > 1 else 0.0,
            "choice": json.loads((exp / "choice.json").read_text())["line"] if (exp / "choice.json").is_file() else ""}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/selection"), help="working folder (default: %(default)s)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: %(default)s")
    ap.add_argument("--steps", type=int, default=400, help="training steps per seed (default: %(default)s)")
    ap.add_argument("--test-speakers", type=int, default=5, help="test speakers (default: %(default)s)")
    ap.add_argument("--every", type=int, default=50, help="a validated checkpoint every N steps (default: %(default)s)")
    ap.add_argument("--corpora", nargs="+", choices=["full", "few"], default=["full", "few"],
                    help="real-mini as it is, and with 5 utterances per speaker (default: %(default)s)")
    args = ap.parse_args()
    if not REAL_MINI.is_dir():
        sys.exit(f"{REAL_MINI} not found: the shared data sits in ../shared/data beside the checkout")
    for corpus in args.corpora:
        work = args.work.resolve() / corpus
        source = REAL_MINI if corpus == "full" else few_utterances_corpus(work / "corpus")
        data = work / "data"
        run("prepare_voxceleb.py", "--corpus", source, "--out", data, "--test-speakers", args.test_speakers,
            "--overwrite")
        rows = [one_seed(data, work, seed, args.steps, args.every) for seed in args.seeds]
        print(f"\n{corpus}: {source} ({FEW_UTTERANCES if corpus == 'few' else 'all'} utterances per speaker)")
        print("| seed | chosen on validation | its test EER % | best step on test | its test EER % | last step's EER % "
              "| averaged last 3 EER % | all checkpoints' EER % |")
        print("|---|---|---|---|---|---|---|---|")
        for seed, r in zip(args.seeds, rows):
            print(f"| {seed} | {r['chosen']} | {r['chosen_eer']:.2f} | {r['best_on_test']} | {r['best_eer']:.2f} | "
                  f"{r['last_eer']:.2f} | {r['avg_eer']:.2f} | {r['mean_eer']:.2f} ± {r['sd_eer']:.2f} |")
        for seed, r in zip(args.seeds, rows):
            print(f"seed {seed}: {r['choice']}")
        for key, label in (("chosen_eer", "chosen on validation"), ("best_eer", "best on test (unfair)"),
                           ("last_eer", "last step"), ("avg_eer", "averaged last 3")):
            values = [r[key] for r in rows]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"{label}: test EER {statistics.mean(values):.2f} ± {spread:.2f} %")


if __name__ == "__main__":
    main()
