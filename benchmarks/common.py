"""What the benchmarks share: where the checkout and ../shared are, running a stage as a subprocess while sampling the memory of its whole process
tree, the corpus view the s3prl peer runner reads, and GPU utilisation sampled while a block runs.

Benchmarks are verbs and never import one another; what two of them need lives here.
"""
from __future__ import annotations

import csv
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]  # the checkout
# real speech, VoxCeleb metadata and the s3prl peer runner, read-only; ASV_SHARED moves it for a fork elsewhere
SHARED = Path(os.environ.get("ASV_SHARED", ROOT.parent / "shared"))
REAL_MINI = SHARED / "data" / "real-mini"
VOX1_META = SHARED / "data" / "voxceleb1-meta"
PEERS = SHARED / "peers"


def tree_pss_kib(root_pid: int) -> int:
    """Summed PSS (KiB) of root_pid and all its descendants (by parent pid, so setsid'd stages count too).

    PSS splits shared pages between the processes that map them, so forked loader workers and the
    fork before each `sox` exec are not counted twice, as RSS would count them."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d))
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("Pss:")), 0)
        except OSError:
            pass
    return total


def run_measured(name: str, cmd: list, logs: Path, env: dict | None = None, cwd: Path | None = None,
                 tag: str = "measure") -> dict:
    """Run cmd (a list) with its output in logs/<name>.log; returns wall s, CPU s (user + system of the command
    and every descendant it waited for: what other jobs on a shared machine barely change) and peak PSS MB of
    the whole tree (sampled every 0.5 s). Exits with the log's tail when the command fails."""
    log = logs / f"{name}.log"
    print(f"[{tag}] {name}: {' '.join(map(str, cmd))}", flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0, peak = time.perf_counter(), 0
    with open(log, "w") as f:
        proc = subprocess.Popen(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, **(env or {})})
        while proc.poll() is None:
            peak = max(peak, tree_pss_kib(proc.pid))
            time.sleep(0.5)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if proc.returncode != 0:
        sys.exit(f"[{tag}] {name} failed (rc {proc.returncode}); {log}:\n" + "".join(open(log).readlines()[-30:]))
    print(f"[{tag}] {name}: {wall:.0f} s, CPU {cpu:.1f} s, peak PSS {peak / 1024:.0f} MB", flush=True)
    return {"wall": wall, "cpu": cpu, "pss": peak / 1024, "cmd": " ".join(map(str, cmd)), "env": env or {}}


def peer_view(data: Path, view: Path, trials: Path | None = None) -> Path:
    """The s3prl peer runner's view of one of our data folders: view/wav/<spk>/<session>/<utt>.wav for every
    utterance (WAV linked, FLAC re-wrapped losslessly as WAV: the peer reads .wav only) and view/trials.txt,
    `trials` (default: the data folder's test list) with its utterance ids mapped to those files."""
    shutil.rmtree(view, ignore_errors=True)
    with open(data / "utterances.csv", newline="") as f:
        utts = list(csv.DictReader(f))
    mapped = {}
    for u in utts:
        src = data / u["path"]  # relative to the data folder, or absolute
        rel = str(Path(u["id"]).with_suffix(".wav"))
        dst = view / "wav" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix.lower() == ".wav":
            dst.symlink_to(src.resolve())
        else:
            info = sf.info(str(src))
            sf.write(str(dst), sf.read(str(src), dtype="float64")[0], info.samplerate, subtype=info.subtype)
        mapped[u["id"]] = rel
    lines = [line.split() for line in open(trials or data / "trials" / "test.txt") if line.strip()]
    (view / "trials.txt").write_text("".join(f"{label} {mapped[a]} {mapped[b]}\n" for label, a, b in lines))
    return view / "trials.txt"


def peer_stages(summary: Path) -> dict[str, tuple[float, int]]:
    """{stage: (wall s, peak PSS MiB of its process group)} from the peer runner's summary.txt."""
    stages = {}
    for line in open(summary):
        if m := re.match(r"(prep|s3prl_\S+)\s+(\S+)\s+(\d+)MiB\s+(\d+)MiB", line):
            h, mi, s = (["0", "0"] + m[2].split(":"))[-3:]  # /usr/bin/time's [h:]m:s
            stages[m[1]] = (3600 * float(h) + 60 * float(mi) + float(s), int(m[4]))
    return stages


def gpu_percent() -> int | None:
    """The first GPU's utilisation now: torch.cuda.utilization() (needs pynvml), else nvidia-smi."""
    import torch  # here: the subprocess-driving benchmarks need no torch

    try:
        return int(torch.cuda.utilization())
    except Exception:  # pynvml missing or NVML refusing: ask nvidia-smi
        if not shutil.which("nvidia-smi"):
            return None
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True).stdout.strip()
        return int(out) if out.isdigit() else None


class GpuUtilisation:
    """GPU utilisation sampled every 0.2 s in a thread while the block runs (nothing on the CPU)."""

    def __init__(self, device):
        self.samples, self.stop, self.thread = [], threading.Event(), None
        self.enabled = device.type == "cuda"

    def __enter__(self):
        if self.enabled:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.2):
            value = gpu_percent()
            if value is not None:
                self.samples.append(value)

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread:
            self.thread.join()

    def text(self) -> str:
        if not self.samples:
            return "GPU util n/a" + (" (CPU)" if not self.enabled else " (no NVML, no nvidia-smi)")
        return f"GPU util mean {statistics.mean(self.samples):.0f}% (max {max(self.samples)}%)"
