"""The benchmark scripts run at tiny settings and print their tables (no timing assertions)."""
import re
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REAL_MINI, REPO as ROOT, VOX1_META

NUMBER = r"(\d+(?:\.\d+)?)"


def run(*args, timeout=300):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


def positive(text: str) -> float:
    value = float(re.match(NUMBER, text.strip()).group(1))
    assert value > 0, text
    return value


def table_rows(out: str, title: str) -> list[list[str]]:
    """The body rows of the Markdown table under '## <title>...'."""
    block = out.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    lines = [l for l in block.splitlines() if l.startswith("|")]
    return [[c.strip() for c in l.strip("|").split("|")] for l in lines[2:]]


def test_benchmark_quick(real_mini, vox1_meta):
    out = run("benchmarks/benchmark.py", "--quick")
    assert out.startswith("# benchmark.py --quick")
    assert re.search(r"^device: \S+", out, re.M) and re.search(r"^torch \S+, threads \d+", out, re.M)

    train = table_rows(out, "training throughput")
    # per model: data with the config's workers (num_workers -1: none on 1 CPU) and in the process, model, both
    data = [row for row in train if row[1].startswith("data only")]
    assert sum(row[1] == "data only (0 workers)" for row in data) == 2 and len(data) in (2, 3, 4)
    assert len(train) == len(data) + 4
    for row in train:
        positive(row[2]), positive(row[3])
    assert sum("bottleneck" in row[4] for row in train) == 2

    evaluation = table_rows(out, "evaluation throughput")
    assert {"simple (batch 1, full length)"} <= {row[1] for row in evaluation}
    for row in evaluation:
        positive(row[2]), positive(row[3]), positive(row[4])
    # batching changes speed only: every alternative batching's embeddings against the default's
    # tolerance: float32 rounding of the same frames in another order, 1 - cosine ~1e-12
    agreement = re.findall(r"default batching vs \S+ s batches, lowest cosine over \d+ utterances: ([\d.]+)", out)
    assert len(agreement) >= 4 and all(float(c) >= 0.99999 for c in agreement), agreement

    rows = table_rows(out, "metrics on")
    ours, s3prl = rows[0], rows[1]
    for row in (ours, s3prl):
        positive(row[1]), positive(row[3])
    assert abs(float(ours[3]) - float(s3prl[3])) < 0.01  # same EER %, two ways
    positive(rows[2][1])

    for row in table_rows(out, "vectorised pieces"):
        positive(row[2]), positive(row[4]), positive(row[5])


def test_bench_vox1_eval_tiny(vox1_meta, tmp_path):
    out = run("benchmarks/bench_vox1_eval.py", "--work", tmp_path, "--fraction", "0.02", "--lists", "vox1-O",
              "--simple-utts", "4", "num_workers=0")
    report = out.split("## bench_vox1_eval", 1)[1]
    fields = {k.strip(): v for k, v in (line.split(" : ", 1) for line in report.splitlines() if " : " in line)}
    for key in ("utterances evaluated", "audio hours", "eval wall time (s)", "utterance-seconds per second",
                "peak RSS (MB, largest process)", "subset: simple way, batch 1 (utt-s/s)",
                "subset: ours, asv.embed.embed (utt-s/s)", "subset: ours / simple"):
        positive(fields[key])
    assert fields["lists"].startswith("vox1-O")
    assert re.search(r"EER [\d.]+%, \d+ trials", fields["stage: vox1-O done at (s)"])
    # batched, padded evaluation gives the embeddings one-at-a-time evaluation gives
    # tolerance: the benchmark's own cosine on float32 embeddings; exact evaluation gives > 0.99999
    assert float(fields["subset: min cosine(simple, ours) per utt"]) > 0.999
    assert (tmp_path / "exp" / "step-1" / "eval" / "vox1-O" / "metrics.json").is_file()


@pytest.mark.parametrize("script, folder", [("benchmarks/benchmark.py", REAL_MINI),
                                            ("benchmarks/bench_vox1_eval.py", VOX1_META),
                                            ("benchmarks/bench_manifest.py", REAL_MINI)])
def test_missing_shared_data_is_one_line_naming_the_folder(script, folder, tmp_path):
    """Run from a copy of the checkout with no ../shared/data beside it."""
    copy = tmp_path / "checkout"
    (copy / "benchmarks").mkdir(parents=True)
    for name in (script, "benchmarks/common.py"):
        (copy / name).write_text((ROOT / name).read_text())
    args = ["--work", str(tmp_path / "work")] if "bench_" in script else []
    result = subprocess.run([sys.executable, script, *args], cwd=copy, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    missing = tmp_path / "shared" / "data" / folder.name
    assert len(lines) == 1 and lines[0].startswith(f"{missing}: ") and "not found" in lines[0], result.stderr


def test_calibration_check_reads_both_score_files(tmp_path):
    """Overconfident raw scores (x 20) against the same scores unscaled: lower Cllr, never below min Cllr."""
    rng = np.random.default_rng(0)
    labels = np.repeat([1, 0], 500)
    llrs = np.where(labels == 1, 1.0, -1.0) + rng.normal(size=labels.size)  # N(+-1, 1): the LLR is 2x these
    for name, values in (("scores.txt", 20 * llrs), ("scores_calibrated.txt", llrs)):
        (tmp_path / name).write_text("".join(f"a b {v:.6f} {l}\n" for v, l in zip(values, labels)))
    out = run("benchmarks/calibration_check.py", tmp_path)
    raw, calibrated, floor = (float(c) for c in out.strip().splitlines()[-1].strip("|").split("|")[2:5])
    assert floor <= calibrated < raw
    (tmp_path / "scores_calibrated.txt").unlink()
    result = subprocess.run([sys.executable, "benchmarks/calibration_check.py", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode != 0 and result.stderr.startswith(f"{tmp_path / 'scores_calibrated.txt'}: not found")
    (tmp_path / "scores_calibrated.txt").write_text("a b not-a-number 1\n")
    result = subprocess.run([sys.executable, "benchmarks/calibration_check.py", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith(f"{tmp_path / 'scores_calibrated.txt'}: ")


def test_bench_loader_quick(real_mini, tmp_path):
    out = run("benchmarks/bench_loader.py", "--files", 4, "--examples", 8, "--work", tmp_path)
    rows = table_rows(out, "crops/s per CPU core")
    assert [r[0] for r in rows] == ["SUPERB: effects + 8 s crops", "SUPERB + noise/RIR", "fixed 2-3 s crops, no effects",
                                    "fixed 2-3 s crops + noise/RIR"]
    for r in rows:
        assert all(positive(c.rstrip("x")) for c in r[1:6])
    assert "every timed example of the two paths was equal" in out  # else the script exits non-zero
    assert "and so was every one from shards" in out and table_rows(out, "crops/s per CPU core")[0][3] != "-"
    gpu = table_rows(out, "what a GPU consumes")
    assert gpu[0][1:3] == ["112", "3,532"]  # 14 GFLOP/s x 8 s; 0.4 x 989 TFLOP/s / 112 GFLOP
    assert len(gpu) == 3 and all(positive(r[2].replace(",", "")) for r in gpu)


def test_calibration_check_with_a_refused_calibration_shows_the_raw_cllr(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat([1, 0], 100)
    scores = np.where(labels == 1, 0.6, 0.1) + rng.normal(0, 0.2, labels.size)
    (tmp_path / "scores.txt").write_text("".join(f"a b {v:.6f} {l}\n" for v, l in zip(scores, labels)))
    (tmp_path / "metrics.json").write_text(json.dumps({"calibration": {"refused": "too few"}}))
    out = run("benchmarks/calibration_check.py", tmp_path).strip().splitlines()[-1]
    cells = [c.strip() for c in out.strip("|").split("|")]
    assert cells[3] == f"{cells[2]} (refused: raw)"  # the identity: the raw scores' Cllr, never worse
