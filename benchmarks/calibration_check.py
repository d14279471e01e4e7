"""Does calibration help on the test trials? Cllr of the raw cosine scores (read as if they were LLRs), of
the calibrated scores, and min Cllr (the best any monotonic calibration could do), for evaluated lists.

    python benchmarks/calibration_check.py exp/demo/best/eval/test

Each folder is one list's evaluation output (evaluate_asv.py writes scores.txt and, when the run has
validation speakers, scores_calibrated.txt: `enroll test score label` per line). The calibration was fitted
on the validation trials only, so the test Cllr is a fair measure of it.
"""
import argparse
import json
import sys
from pathlib import Path

from asv import metrics
from asv.metrics import read_scores


def read_json(path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", type=Path, nargs="+", help="evaluation folders, e.g. exp/demo/best/eval/test")
    args = ap.parse_args()
    print("| list | trials | Cllr, raw cosine | Cllr, calibrated | min Cllr |")
    print("|---|---|---|---|---|")
    for folder in args.folders:
        raw, calibrated = folder / "scores.txt", folder / "scores_calibrated.txt"
        # a refused calibration (too few or separated validation trials) leaves the raw scores: identity
        refused = not calibrated.is_file() and "refused" in read_json(folder / "metrics.json").get("calibration", {})
        for path in (raw,) if refused else (raw, calibrated):
            if not path.is_file():
                sys.exit(f"{path}: not found (a run without validation speakers has no calibration)")
        try:
            scores, labels = read_scores(raw)
            llrs = scores if refused else read_scores(calibrated)[0]
        except ValueError as e:  # one line naming the file
            sys.exit(str(e))
        print(f"| {folder} | {len(labels)} | {metrics.compute_cllr(scores, labels):.4f} | "
              f"{metrics.compute_cllr(llrs, labels):.4f}{' (refused: raw)' if refused else ''} | "
              f"{metrics.compute_min_cllr(scores, labels):.4f} |")


if __name__ == "__main__":
    main()
