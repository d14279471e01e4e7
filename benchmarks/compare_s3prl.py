"""Side by side: this toolkit vs the real s3prl 0.4.18 SuperbASV (fbank upstream), same data, same trials.

    python benchmarks/compare_s3prl.py --work /tmp/cmp --steps-ours 300 --steps-peer 20 --steps-peer-ours 60

1. data: our prepare_voxceleb.py output (--data), or real-mini prepared into WORK/data.
2. peer corpus view WORK/peer_corpus: wav/<spk>/<session>/<utt>.wav for our train + test speakers only
   (FLAC -> WAV; the peer reads .wav only) and trials.txt = our trials/test.txt with mapped paths.
   The peer trains on every speaker not in the trials, i.e. exactly our training speakers.
3. runs, each timed by /usr/bin/time -v (max RSS of the largest process) plus a 0.5 s sampler of the
   summed PSS of the whole process tree: the peer with its SUPERB recipe, the peer with our demo
   recipe's hyper-parameters (where its CLI allows), and our train_asv.py with configs/demo.yaml.
4. prints a Markdown table and the exact commands.
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import soundfile as sf
import yaml

ROOT = Path(__file__).resolve().parent.parent
# our configs/demo.yaml expressed in s3prl overrides; not expressible: 40 mels (s3prl fbank: 80 + deltas + CMVN),
# AAM-softmax (s3prl: AM only), TDNN channels 128 (s3prl: fixed 512), BatchNorm in the TDNN, crops repeated
# to exactly 2 s (s3prl: crops of at most 2 s, shorter utterances zero-padded).
PEER_OURS_ENV = {"BATCH_SIZE": "32", "GRAD_ACCUM": "1"}
PEER_OURS_ARGS = ["--build_optimizer.name", "Adam", "--build_optimizer.conf.lr", "1e-3",
                  "--build_task.loss_conf.margin", "0.2", "--build_task.loss_conf.scale", "30",
                  "--build_dataset.train.max_secs", "2.0", "--build_dataset.train.min_secs", "0.0",
                  "--train.gradient_clipping", "5.0", "--build_downstream.hidden_size", "128",
                  "--build_downstream.aggregation_size", "384", "--build_downstream.output_size", "128"]


def tree_pss_kib(root_pid):
    """Summed PSS (KiB) of root_pid and all its descendants (by parent pid, so setsid'd stages count too)."""
    children = {}
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
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            pass
    return total


def run_measured(name, cmd, log_dir, env=None, cwd=None):
    """Run cmd (a list) under /usr/bin/time -v; returns wall s, max RSS MB (one process), peak PSS MB (tree)."""
    log, tv = log_dir / f"{name}.log", log_dir / f"{name}.time"
    print(f"[compare] {name}: {' '.join(cmd)}", flush=True)
    t0, peak = time.perf_counter(), 0
    with open(log, "w") as f:
        proc = subprocess.Popen(["/usr/bin/time", "-v", "-o", str(tv), *cmd], stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, cwd=cwd)
        while proc.poll() is None:
            peak = max(peak, tree_pss_kib(proc.pid))
            time.sleep(0.5)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"[compare] {name} failed (rc {proc.returncode}); see {log}:\n" + "".join(open(log).readlines()[-30:]))
    rss = next(int(l.split(":")[1]) for l in open(tv) if "Maximum resident set size" in l)
    print(f"[compare] {name}: {wall:.0f} s, max RSS {rss / 1024:.0f} MB, peak PSS {peak / 1024:.0f} MB", flush=True)
    return {"wall": wall, "rss": rss / 1024, "pss": peak / 1024, "cmd": cmd, "env": env or {}, "cwd": cwd}


def build_peer_corpus(data, view):
    """WORK/peer_corpus/{wav/<spk>/<session>/<utt>.wav, trials.txt} from our data dir (train + test splits)."""
    with open(data / "utterances.csv", newline="") as f:
        utts = [u for u in csv.DictReader(f) if u["split"] in ("train", "test")]
    trials = [line.split() for line in open(data / "trials" / "test.txt") if line.strip()]
    trial_spk = {u["speaker"] for u in utts if u["split"] == "test" and u["path"] in {p for t in trials for p in t[1:]}}
    if view.exists():
        shutil.rmtree(view)
    mapped, converted = {}, 0
    for u in utts:
        if u["split"] == "test" and u["speaker"] not in trial_spk:
            continue  # the peer would take a test speaker absent from the trials for a training speaker
        src = Path(u["path"])
        dst = view / "wav" / u["speaker"] / src.parent.name / (src.stem + ".wav")
        if dst in mapped.values():
            sys.exit(f"[compare] two utterances map to {dst}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix.lower() == ".wav":
            dst.symlink_to(src)
        else:  # lossless re-wrap: same samples, same rate, same sample format where WAV has it
            info = sf.info(str(src))
            wav, sr = sf.read(str(src), dtype="float64")
            sf.write(str(dst), wav, sr, subtype=info.subtype if sf.check_format("WAV", info.subtype) else "FLOAT")
            converted += 1
        mapped[u["path"]] = dst
    with open(view / "trials.txt", "w") as f:
        for label, a, b in trials:
            f.write(f"{label} {mapped[a]} {mapped[b]}\n")
    n_train = sum(u["split"] == "train" for u in utts)
    print(f"[compare] peer corpus {view}: {len(mapped)} files ({converted} FLAC->WAV), {n_train} train utts, "
          f"{len(trial_spk)} test speakers, {len(trials)} trials", flush=True)
    return view / "trials.txt"


def run_peer(args, name, steps, corpus, trials, env=None, extra=()):
    out = args.work / name
    r = run_measured(name, ["bash", str(args.peer_dir / "run_s3prl_asv.sh"), str(corpus), str(out), str(steps),
                            *extra], args.work / "logs",
                     env={"FORCE": "1", "VENV": str(args.peer_venv), "TRIALS": str(trials), **(env or {})})
    res = yaml.safe_load(open(out / "exp" / "evaluate" / "test_trial" / f"step_{steps}" / "result.yaml"))
    removed = {l.split("Remove utt ")[1].split(" since")[0]
               for l in open(out / "logs" / "s3prl_stage2_train.log") if "Remove utt " in l}
    with open(out / "exp" / "train.csv", newline="") as f:
        train = [(row["id"], row["spk"]) for row in csv.DictReader(f)]
    kept_spk = {spk for uid, spk in train if uid not in removed}
    r.update(eer=100 * res["EER"], dcf=res["minDCF"], steps=steps,
             crops=steps * int((env or {}).get("BATCH_SIZE", 10)) * int((env or {}).get("GRAD_ACCUM", 5)),
             note=f"trained on {len(train) - len(removed)}/{len(train)} utts, {len(kept_spk)}/"
                  f"{len({s for _, s in train})} speakers (s3prl drops utts <= min_secs after SoX silence trim)")
    return r


def run_ours(args, steps):
    exp = args.work / "ours"
    shutil.rmtree(exp, ignore_errors=True)  # a fresh run: train_asv.py would otherwise resume
    r = run_measured("ours", [sys.executable, "train_asv.py", "--config", "configs/demo.yaml",
                              f"data.dir={args.data}", f"exp_dir={exp}", f"train.total_steps={steps}"],
                     args.work / "logs", cwd=ROOT)
    m = json.loads((exp / "best" / "eval" / "test" / "metrics.json").read_text())
    cfg = yaml.safe_load(open(exp / "config.yaml"))
    r.update(eer=m["eer"], dcf=m["min_dcf_0.01"], steps=steps,
             crops=steps * cfg["data"]["batch_size"] * cfg["train"]["gradient_accumulate"],
             note=f"{m['num_trials']} trials scored; best ckpt {(exp / 'best').resolve().name} (by valid EER)")
    return r


def main():
    class Fmt(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Fmt)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cmp"), help="working folder (wiped run dirs inside)")
    ap.add_argument("--data", type=Path, help="prepared data dir (default: --corpus prepared into WORK/data)")
    ap.add_argument("--corpus", type=Path, default=Path("/work/shared/data/real-mini"), help="used without --data")
    ap.add_argument("--steps-ours", type=int, default=300, help="our optimizer steps (32 crops each)")
    ap.add_argument("--steps-peer", type=int, default=20, help="peer steps, SUPERB recipe (50 crops each)")
    ap.add_argument("--steps-peer-ours", type=int, default=60, help="peer steps with our recipe (0: skip)")
    ap.add_argument("--peer-dir", type=Path, default=Path("/work/shared/peers/s3prl-run"), help="the s3prl runner")
    ap.add_argument("--peer-venv", type=Path, default=Path("/tmp/s3prl-peer-venv"),
                    help="the runner's VENV: the virtual environment s3prl 0.4.18 runs in")
    args = ap.parse_args()
    args.work = args.work.resolve()
    (args.work / "logs").mkdir(parents=True, exist_ok=True)
    if not Path("/usr/bin/time").is_file():
        sys.exit("GNU time missing: apt-get install time")
    if args.data is None:
        args.data = args.work / "data"
        if not (args.data / "utterances.csv").is_file():
            subprocess.run([sys.executable, str(ROOT / "prepare_voxceleb.py"), "--corpus", str(args.corpus), "--out",
                            str(args.data), "--test-speakers", "5", "--valid-speakers", "2"], check=True)
    args.data = args.data.resolve()
    trials = build_peer_corpus(args.data, args.work / "peer_corpus")

    rows = [("s3prl 0.4.18 SuperbASV", "SUPERB (AdamW 1e-4, AM m0.4, 10x5 crops <=8 s, 512-d)",
             run_peer(args, "peer_superb", args.steps_peer, args.work / "peer_corpus", trials))]
    if args.steps_peer_ours > 0:
        rows.append(("s3prl 0.4.18 SuperbASV", "ours (Adam 1e-3, AM m0.2, 32 crops <=2 s, 128-d)",
                     run_peer(args, "peer_ours_recipe", args.steps_peer_ours, args.work / "peer_corpus", trials,
                              PEER_OURS_ENV, PEER_OURS_ARGS)))
    rows.append(("this toolkit", "configs/demo.yaml (Adam 1e-3, AAM m0.2, 32 crops of 2 s, 40 mels)",
                 run_ours(args, args.steps_ours)))

    print(f"\nData: {args.data} ({Path(args.data, 'trials', 'test.txt')}); peer corpus view: {args.work / 'peer_corpus'}\n")
    print("| system | recipe | steps | crops seen | EER % | minDCF 0.01 | wall s | peak RSS MB (1 proc) "
          "| peak PSS MB (tree) | notes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for system, recipe, r in rows:
        print(f"| {system} | {recipe} | {r['steps']} | {r['crops']} | {r['eer']:.2f} | {r['dcf']:.4f} | "
              f"{r['wall']:.0f} | {r['rss']:.0f} | {r['pss']:.0f} | {r['note']} |")
    print("\nCommands (run under /usr/bin/time -v):")
    for _, _, r in rows:
        env = " ".join(f"{k}={v}" for k, v in r["env"].items())
        cd = f"cd {r['cwd']} && " if r.get("cwd") else ""
        print(f"    {cd}{env + ' ' if env else ''}{' '.join(r['cmd'])}")


if __name__ == "__main__":
    main()
