#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) from the repository root, with whatever arguments it is given.
cd "$(dirname "$0")/.." && exec python benchmarks/gpu_check.py "$@"
