#!/usr/bin/env bash
# The demo, end to end on the CPU in a few minutes: a synthetic 40-speaker corpus, a small x-vector
# trained for 300 steps (configs/demo.yaml), the checkpoint chosen on validation speakers tested on
# held-out speakers, and exp/demo/report.md. Re-running resumes or does nothing.
set -euo pipefail
cd "$(dirname "$0")"
python prepare_voxceleb.py --demo --out data/demo
python train_asv.py --config configs/demo.yaml
python report.py exp/demo
