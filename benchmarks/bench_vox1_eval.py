"""A VoxCeleb1-shaped evaluation workload: real utterance lengths, real trial lists, generated audio.

    python benchmarks/bench_vox1_eval.py --lists vox1-O --fraction 1.0 --work /tmp/vox1_bench
    python benchmarks/bench_vox1_eval.py --fraction 0.03 --lists vox1-O num_workers=2

1. Durations of every VoxCeleb1 utterance (vox1_{test,dev}_duration.txt.gz) and the official trial
   lists come from the shared metadata. --fraction keeps a seeded random share of the utterances the
   chosen lists name, and only the trials among them; the utterances those trials name are evaluated.
   Note the scale: vox1-O names the 4,715 test utterances (10.9 h), but vox1-E and vox1-H name
   utterances of all 1,251 VoxCeleb1 speakers (145k utterances, 333 h, ~38 GB of 16-bit audio).
2. Audio of exactly those lengths (16 kHz PCM16, a per-speaker tone in noise, seeded per utterance)
   is generated once into WORK/audio and reused; WORK/vox1/wav is rebuilt as a symlink view of
   this run's utterances (plus a few tiny fake training speakers, id9xxxx, because prepare and
   training need training speakers), then prepare_voxceleb.py --voxceleb1 writes WORK/data.
3. A filterbank x-vector run folder (configs/xvector_bn.yaml, 1 training step) is made once
   into WORK/exp (delete it to rebuild after changing configs/xvector_bn.yaml).
4. evaluate_asv.py on every list, as a subprocess under /usr/bin/time -v: wall time, audio seconds
   per second, peak RSS; per-stage times from when its lines appear.
5. In process, on a small random subset of the same utterances: the simple way (one utterance at a
   time at full length, batch size 1, as s3prl does) against our batched path (asv.embed.embed).
"""
from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from accelerate import Accelerator
from common import ROOT, VOX1_META

from asv.audio import load_audio
from asv.embed import embed, eval_loader, load_extractors

SR = 16000
# list name -> official file stem (prepare_voxceleb.py names lists from these stems, so we keep them)
LIST_STEMS = {"vox1-O": "veri_test", "vox1-E": "list_test_all", "vox1-H": "list_test_hard"}
FAKE_SPEAKERS, FAKE_FILES, FAKE_SECS = 6, 3, 4.0  # prepare needs >= 2 valid + 2 train speakers outside the trials


def list_file(name: str, meta: Path) -> Path:
    """vox1-O -> veri_test.txt(.gz); vox1-O-clean -> veri_test2.txt(.gz); exits if the file is absent."""
    base = name.removesuffix("-clean")
    if base not in LIST_STEMS:
        sys.exit(f"unknown list {name!r}: choose from {', '.join(n + s for n in LIST_STEMS for s in ('', '-clean'))}")
    stem = LIST_STEMS[base] + ("2" if name.endswith("-clean") else "")
    for candidate in (meta / f"{stem}.txt", meta / f"{stem}.txt.gz"):
        if candidate.is_file():
            return candidate
    sys.exit(f"{name}: neither {stem}.txt nor {stem}.txt.gz in {meta}")


def default_lists(meta: Path) -> list[str]:
    """O, E and H, the cleaned versions where the metadata has them."""
    return [f"{n}-clean" if any((meta / f"{LIST_STEMS[n]}2{ext}").is_file() for ext in (".txt", ".txt.gz")) else n
            for n in LIST_STEMS]


def read_durations(meta: Path) -> dict[str, float]:
    """utterance id (idXXXXX/<video>/<nnnnn>) -> seconds, test and dev (E and H name dev utterances too)."""
    out = {}
    for name in ("vox1_test_duration.txt.gz", "vox1_dev_duration.txt.gz"):
        with gzip.open(meta / name, "rt") as f:
            for line in f:
                utt, secs = line.split()
                out[utt] = float(secs)
    return out


def read_list(path: Path) -> list[tuple[str, str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [tuple(line.split()) for line in f if line.strip()]


def utt_id(trial_path: str) -> str:
    return trial_path.removesuffix(".wav")


def synth(utt: str, num_samples: int) -> np.ndarray:
    """Cheap deterministic audio: a per-speaker tone in noise, seeded by the utterance id (int16)."""
    rng = np.random.default_rng(zlib.crc32(utt.encode()))
    f0 = 100 + zlib.crc32(utt.split("/")[0].encode()) % 200  # speaker-dependent pitch
    t = np.arange(num_samples, dtype=np.float32) / SR
    x = 0.2 * np.sin(2 * np.pi * f0 * t) + 0.05 * rng.standard_normal(num_samples, dtype=np.float32)
    return (x * 32767).astype(np.int16)


def ensure_audio(cache: Path, wanted: dict[str, int]) -> tuple[int, float]:
    """Write WORK/audio/<utt>.wav for every utterance not already there at the right length.

    Returns (files generated, seconds spent). A file is written to .tmp and renamed, so an
    interrupted run never leaves a short file that a later run would take as done.
    """
    todo = []
    for utt, n in wanted.items():
        path = cache / f"{utt}.wav"
        try:
            if sf.info(str(path)).frames == n:
                continue
        except Exception:  # missing or unreadable: (re)generate
            pass
        todo.append(utt)
    need = sum(44 + 2 * wanted[u] for u in todo)
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if need > free - (1 << 30):  # keep 1 GB spare for the other jobs sharing the disk
        sys.exit(f"{cache}: generating {len(todo)} files needs {need / 1e9:.1f} GB, only {free / 1e9:.1f} GB free")
    if todo:
        print(f"[vox1] generating {len(todo)} files ({need / 1e9:.2f} GB) into {cache}", flush=True)
    tic = time.perf_counter()
    for k, utt in enumerate(todo, 1):
        path = cache / f"{utt}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        sf.write(str(tmp), synth(utt, wanted[utt]), SR, subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
        if k % 5000 == 0:
            print(f"[vox1]   {k}/{len(todo)}", flush=True)
    return len(todo), time.perf_counter() - tic


def build_view(view: Path, cache: Path, utts: list[str]):
    """WORK/vox1/wav/<spk>/<video>/<n>.wav -> the cached files; rebuilt each run so prepare sees only this run."""
    if view.exists():
        shutil.rmtree(view)
    for utt in utts:
        link = view / f"{utt}.wav"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(cache / f"{utt}.wav")


def run_logged(cmd: list[str], log: Path, env: dict | None = None) -> list[tuple[float, str]]:
    """Run cmd, keep its output in log, return (seconds since start, line) for every output line."""
    print(f"[vox1] $ {' '.join(cmd)}", flush=True)
    lines, tic = [], time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                env={**os.environ, **(env or {})})
        for line in proc.stdout:
            lines.append((time.perf_counter() - tic, line.rstrip("\n")))
            f.write(line)
        proc.wait()
    if proc.returncode != 0:
        tail = "\n".join(text for _, text in lines[-30:])
        sys.exit(f"[vox1] failed (rc {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return lines


@torch.no_grad()
def simple_vs_batched(ckpt: Path, paths: list[str], durations: list[float], overrides: list[str],
                      repeats: int) -> dict:
    """Same checkpoint, same utterances: one at a time at full length vs our length-sorted batches.

    The two alternate `repeats` times and each keeps its fastest run, so a burst of load from
    other jobs on the machine does not decide the ratio."""
    ex = load_extractors([ckpt], overrides)  # as evaluate_asv.py loads it
    cfg = ex.cfg
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    device = accelerator.device
    upstream, encoder = ex.upstreams[0].to(device), ex.encoders[0].to(device)
    need = ex.min_samples

    # one short warm-up pass, so neither side pays the first call's one-off costs (thread pools, allocator)
    warm = torch.zeros(1, need, device=device)
    encoder(*upstream(warm, torch.tensor([need], device=device)))

    def simple():  # read a file, run it alone, next file (file reading counts, as it does in ours)
        out = []
        for p in paths:
            wav = load_audio(p, cfg.data.sample_rate)
            if wav.numel() < need:
                wav = wav.repeat(need // wav.numel() + 1)[:need]
            hidden, frames = upstream(wav[None].to(device), torch.tensor([wav.numel()], device=device))
            out.append(encoder(hidden, frames).float().cpu().numpy()[0])
        return np.stack(out)

    def batched():
        loader = accelerator.prepare(eval_loader(paths, durations, cfg, need, accelerator.device))
        (table,), done = embed(accelerator, [upstream], [encoder], loader, len(paths), -1,
                               int(cfg.data.eval_chunk_secs * cfg.data.sample_rate))
        assert done.all()
        return table

    best, embeddings = {"simple": float("inf"), "batched": float("inf")}, {}
    for _ in range(repeats):
        for name, fn in (("simple", simple), ("batched", batched)):
            tic = time.perf_counter()
            embeddings[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - tic)
    one_by_one, table = embeddings["simple"], embeddings["batched"]
    cos = (one_by_one * table).sum(1) / (np.linalg.norm(one_by_one, axis=1) * np.linalg.norm(table, axis=1))
    return {"utts": len(paths), "secs": float(sum(durations)), "simple_s": best["simple"],
            "batched_s": best["batched"], "min_cos": float(cos.min()), "device": str(device), "repeats": repeats}


# ---------------------------------------------------------------------------- the steps of main

def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vox1_bench"),
                        help="cache and scratch folder (audio is generated once here and reused)")
    parser.add_argument("--fraction", type=float, default=1.0,
                        help="share of the lists' utterances to keep (seeded); only trials among them are kept")
    parser.add_argument("--lists", nargs="+", default=None,
                        help="vox1-O, vox1-E, vox1-H (original lists) or vox1-O-clean etc. (cleaned lists; "
                             "need veri_test2.txt etc. in --meta); default: all three, cleaned where available")
    parser.add_argument("--meta", type=Path, default=VOX1_META, help="VoxCeleb1 metadata folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the utterance sample")
    parser.add_argument("--plan", action="store_true",
                        help="only print the workload (utterances, hours, GB, trials) and exit")
    parser.add_argument("--simple-utts", type=int, default=100,
                        help="utterances in the simple-vs-batched comparison (0: skip it)")
    parser.add_argument("--simple-repeats", type=int, default=2,
                        help="alternating runs of the simple-vs-batched comparison; each side keeps its fastest")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="config overrides for evaluate_asv.py, e.g. num_workers=2 data.eval_batch_secs=600")
    args = parser.parse_args()
    if args.lists:  # `--lists vox1-O key=value`: argparse hands the override to --lists
        args.overrides = [x for x in args.lists if "=" in x] + args.overrides
        args.lists = [x for x in args.lists if "=" not in x] or None
    if not 0 < args.fraction <= 1:
        parser.error("--fraction must be in (0, 1]")
    if not args.meta.is_dir():
        sys.exit(f"{args.meta}: VoxCeleb1 metadata folder not found (the shared data sits in ../shared/data "
                 "beside the checkout; or pass --meta)")
    if not Path("/usr/bin/time").is_file():
        sys.exit("GNU time is missing (/usr/bin/time): apt-get install time")
    return args


@dataclass
class Workload:
    names: list[str]                    # list names, e.g. vox1-O
    files: dict[str, Path]              # name -> official list file
    kept: dict[str, list[tuple]]        # name -> the trials among the sampled utterances
    utts: list[str]                     # the utterances those trials name
    durations: dict[str, float]         # every VoxCeleb1 utterance's length
    sampled: int

    @property
    def secs(self) -> float:
        return sum(self.durations[u] for u in self.utts)


def choose_workload(args) -> Workload:
    """Step 1: which utterances and trials (a seeded share of the lists' utterances)."""
    names = args.lists or default_lists(args.meta)
    files = {name: list_file(name, args.meta) for name in names}
    durations = read_durations(args.meta)
    lists = {name: read_list(path) for name, path in files.items()}
    pool = sorted({utt_id(p) for trials in lists.values() for _, a, b in trials for p in (a, b)})
    missing = [u for u in pool if u not in durations]
    if missing:
        sys.exit(f"{len(missing)} utterances of the lists have no duration in {args.meta}, e.g. {missing[0]}")
    rng = np.random.default_rng(args.seed)
    sample = set(pool) if args.fraction == 1 else set(rng.choice(pool, round(args.fraction * len(pool)), replace=False))
    kept = {name: [t for t in trials if utt_id(t[1]) in sample and utt_id(t[2]) in sample]
            for name, trials in lists.items()}
    for name, trials in kept.items():
        labels = {t[0] for t in trials}
        if labels != {"0", "1"}:
            sys.exit(f"{name}: {len(trials)} trials among {len(sample)} sampled utterances have labels "
                     f"{sorted(labels)}; metrics need target and non-target trials: raise --fraction or change --seed")
    utts = sorted({utt_id(p) for trials in kept.values() for _, a, b in trials for p in (a, b)})
    work = Workload(names, files, kept, utts, durations, len(sample))
    print(f"[vox1] lists {', '.join(f'{n} ({files[n].name})' for n in names)}; {len(pool)} utterances named, "
          f"{len(sample)} sampled (fraction {args.fraction:g}, seed {args.seed}), {len(utts)} in kept trials "
          f"({work.secs / 3600:.2f} h)", flush=True)
    return work


def print_plan(w: Workload):
    gb = sum(44 + 2 * round(w.durations[u] * SR) for u in w.utts) / 1e9
    print(f"[vox1] plan: {len(w.utts)} files, {w.secs / 3600:.2f} h, {gb:.2f} GB of audio; trials: "
          + ", ".join(f"{n} {len(w.kept[n])} ({sum(t[0] == '1' for t in w.kept[n])} target)" for n in w.names))


def prepare_data(work: Path, w: Workload) -> tuple[Path, tuple[int, float]]:
    """Step 2: audio, the corpus view, trial files, then prepare_voxceleb.py (redone: the view changes)."""
    fakes = {f"id9{s:04d}/fakevideo/{n:05d}": int(FAKE_SECS * SR)
             for s in range(1, FAKE_SPEAKERS + 1) for n in range(1, FAKE_FILES + 1)}
    generated = ensure_audio(work / "audio", {**{u: round(w.durations[u] * SR) for u in w.utts}, **fakes})
    build_view(work / "vox1" / "wav", work / "audio", w.utts + sorted(fakes))
    list_dir = work / "lists"
    shutil.rmtree(list_dir, ignore_errors=True)
    list_dir.mkdir()
    trial_files = []
    for name, trials in w.kept.items():
        # keep the official stem: prepare_voxceleb.py names the list (vox1-O, vox1-O-clean, ...) from it
        path = list_dir / (w.files[name].name.removesuffix(".gz"))
        path.write_text("".join(f"{label} {a} {b}\n" for label, a, b in trials))
        trial_files.append(str(path))
    data = work / "data"
    # --overwrite: the same arguments name another sample after a change of --fraction or --lists
    run_logged([sys.executable, str(ROOT / "prepare_voxceleb.py"), "--voxceleb1", str(work / "vox1"),
                "--out", str(data), "--trials", *trial_files, "--overwrite"], work / "prepare.log")
    return data, generated


def make_run(work: Path, data: Path) -> Path:
    """Step 3: a filterbank x-vector run folder after one training step (its weights do not matter for timing)."""
    exp = work / "exp"
    if not (exp / "step-1" / "model.pt").is_file():
        shutil.rmtree(exp, ignore_errors=True)
        run_logged([sys.executable, str(ROOT / "train_asv.py"), "--config", str(ROOT / "configs" / "xvector_bn.yaml"),
                    f"data.dir={data}", f"exp_dir={exp}", "train.total_steps=1", "train.test_after_train=false",
                    "train.log_step=1", "data.batch_size=4", "train.log_with=none"], work / "train.log")
    return exp


def time_evaluation(work: Path, ckpt: Path, names: list[str], overrides: list[str]) -> dict:
    """Step 4: evaluate_asv.py on every list as a user runs it, under /usr/bin/time: wall time, peak RSS and
    when each list's result line appeared."""
    time_file = work / "eval.time"
    # overrides before --trials: evaluate_asv.py would read `--trials NAME key=value` as a list named key=value
    cmd = ["/usr/bin/time", "-v", "-o", str(time_file), sys.executable, str(ROOT / "evaluate_asv.py"),
           "--ckpt-dir", str(ckpt), *overrides, "--trials", *names]
    tic = time.perf_counter()
    lines = run_logged(cmd, work / "eval.log", env={"PYTHONUNBUFFERED": "1"})  # unbuffered: true line times
    wall = time.perf_counter() - tic
    rss_kb = next(int(line.split(":")[1]) for line in open(time_file) if "Maximum resident set size" in line)
    done_at = {}
    for t, text in lines:
        m = re.search(r" \| (\S+) \| EER ([\d.]+)% .*\| (\d+) trials", text)
        if m:
            done_at[m[1]] = (t, float(m[2]), int(m[3]))
    return {"cmd": cmd, "wall": wall, "rss_kb": rss_kb, "done_at": done_at, "time_file": time_file}


def compare_subset(args, w: Workload, work: Path, ckpt: Path) -> dict | None:
    """Step 5: the simple way vs ours on a seeded subset of the same utterances."""
    if args.simple_utts <= 0:
        return None
    pick = sorted(np.random.default_rng(args.seed + 1).choice(len(w.utts), min(args.simple_utts, len(w.utts)),
                                                              replace=False))
    paths = [str(work / "vox1" / "wav" / f"{w.utts[i]}.wav") for i in pick]
    return simple_vs_batched(ckpt, paths, [w.durations[w.utts[i]] for i in pick], args.overrides,
                             max(args.simple_repeats, 1))


def report(args, w: Workload, generated: tuple[int, float], timing: dict, cmp: dict | None, work: Path):
    wall, done_at = timing["wall"], timing["done_at"]
    print("\n## bench_vox1_eval: VoxCeleb1-shaped evaluation (x-vector on log-mel, configs/xvector_bn.yaml, 1 step)")
    rows = [
        ("lists", ", ".join(f"{n} ({w.files[n].name})" for n in w.names)),
        ("fraction (seed)", f"{args.fraction:g} ({args.seed})"),
        ("utterances evaluated", f"{len(w.utts)}"),
        ("audio hours", f"{w.secs / 3600:.3f}"),
        ("trials", ", ".join(f"{n} {len(w.kept[n])}" for n in w.names)),
        ("audio generated (files, s)", f"{generated[0]}, {generated[1]:.1f}"),
        ("eval wall time (s)", f"{wall:.1f}"),
        ("utterance-seconds per second", f"{w.secs / wall:.1f}"),
        ("peak RSS (MB, largest process)", f"{timing['rss_kb'] / 1024:.0f}"),
    ]
    previous = 0.0
    for n in w.names:
        if n in done_at:
            t, eer, num = done_at[n]
            what = "start-up + embed all + score" if previous == 0.0 else "score + metrics + write"
            rows.append((f"stage: {n} done at (s)", f"{t:.1f} (+{t - previous:.1f}: {what}; EER {eer:.2f}%, {num} trials)"))
            previous = t
    rows.append(("stage: exit (s)", f"+{wall - previous:.1f}"))
    if cmp:
        simple_rate, batched_rate = cmp["secs"] / cmp["simple_s"], cmp["secs"] / cmp["batched_s"]
        rows += [
            ("subset: utterances (audio s)", f"{cmp['utts']} ({cmp['secs']:.0f}) on {cmp['device']}, "
                                             f"best of {cmp['repeats']} alternating runs each"),
            ("subset: simple way, batch 1 (utt-s/s)", f"{simple_rate:.1f}"),
            ("subset: ours, asv.embed.embed (utt-s/s)", f"{batched_rate:.1f}"),
            ("subset: ours / simple", f"{batched_rate / simple_rate:.2f}x"),
            ("full eval (incl. start-up, scoring) / simple", f"{w.secs / wall / simple_rate:.2f}x"),
            ("subset: min cosine(simple, ours) per utt", f"{cmp['min_cos']:.6f}"),
        ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}} : {v}")
    print(f"\ncommand: {' '.join(timing['cmd'][4:])}\nlogs: {work / 'eval.log'}, {timing['time_file']}")


def main():
    args = parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    w = choose_workload(args)
    if args.plan:
        print_plan(w)
        return
    data, generated = prepare_data(work, w)
    ckpt = make_run(work, data) / "step-1"
    timing = time_evaluation(work, ckpt, w.names, args.overrides)
    cmp = compare_subset(args, w, work, ckpt)
    report(args, w, generated, timing, cmp, work)


if __name__ == "__main__":
    main()
