"""How fast prepare_voxceleb.py builds a VoxCeleb2 manifest: the scan, the m4a header reads, the rest.

    python benchmarks/bench_manifest.py --files 100000 --work /tmp/manifest_bench
    python benchmarks/bench_manifest.py --files 20000 --workers 1 2 4 8 16

1. A few real utterances (LibriSpeech speakers of ../shared/data/real-mini, cut to at most 8 s,
   VoxCeleb2's typical length) are encoded once to AAC .m4a with PyAV into WORK/sources.
2. WORK/vox2/dev/aac is a VoxCeleb2-shaped tree of --files entries, speaker/video/utterance.m4a with
   23 videos x 8 utterances per speaker (VoxCeleb2 dev: 1,092,009 files, 5,994 speakers, ~182 each),
   made of hard links to those sources: cheap to build, and each entry is a real file FFmpeg opens.
   It is kept and reused while --files stays the same.
3. Timed in this process: a directory walk of the tree; the header reads (asv.audio.header_frames,
   what prepare reads per file) at each --workers count, with threads (what prepare uses) and with
   processes for comparison; then prepare_voxceleb.py end to end as a user runs it (a subprocess:
   scan, headers, splits, trials, manifest; interpreter start-up included) at --main-workers.
The 1M-file projections are linear. The hard links share a few inodes, so everything sits in the
page cache and these are CPU figures: a cold disk adds its latency per file (two reads each).
"""
from __future__ import annotations

import argparse
import fractions
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from common import REAL_MINI, ROOT

from asv.audio import header_frames

SR = 16000
VIDEOS, UTTS = 23, 8  # per speaker, per video


def encode_m4a(path: Path, audio: np.ndarray):
    """AAC in mp4, as VoxCeleb2 ships it (a first pts makes the muxer record the encoder delay)."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=SR, layout="mono")
        frame = av.AudioFrame.from_ndarray(audio[None, :].astype(np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = SR, 0, fractions.Fraction(1, SR)
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


def make_sources(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    flacs = sorted(REAL_MINI.glob("*/*/*.flac"))[::7][:count]  # spread over speakers
    sources = []
    for k, flac in enumerate(flacs):
        path = folder / f"{k}.m4a"
        if not path.is_file():
            encode_m4a(path, sf.read(flac, frames=8 * SR, dtype="float32")[0])
        sources.append(path)
    return sources


def make_tree(aac: Path, files: int, sources: list[Path]):
    """Hard links in a speaker/video/utterance layout; kept while the file count is unchanged."""
    stamp = aac.parent / "files.txt"
    if stamp.is_file() and stamp.read_text() == str(files):
        return
    shutil.rmtree(aac, ignore_errors=True)
    per_speaker = VIDEOS * UTTS
    for i in range(files):
        speaker, rest = divmod(i, per_speaker)
        video, utt = divmod(rest, UTTS)
        folder = aac / f"id{speaker:05d}" / f"video{video:02d}"
        if utt == 0:
            folder.mkdir(parents=True)
        os.link(sources[i % len(sources)], folder / f"{utt + 1:05d}.m4a")
    stamp.write_text(str(files))


def walk(root: Path) -> list[str]:
    """Every file of the speaker/video/utterance tree, as prepare's scan finds them (os.scandir, sorted)."""
    found = []
    for speaker in sorted(os.scandir(root), key=lambda e: e.name):
        for video in sorted(os.scandir(speaker.path), key=lambda e: e.name):
            found += [e.path for e in sorted(os.scandir(video.path), key=lambda e: e.name) if e.is_file()]
    return found


def read_chunk(paths: list[str]) -> int:
    """How many of `paths` have a readable header with some audio (one header read per file)."""
    count = 0
    for path in paths:
        try:
            count += header_frames(path)[0] > 0
        except Exception:  # noqa: BLE001 - an unreadable file counts as unusable, as in prepare
            pass
    return count


def read_headers(paths: list[str], pool: Executor) -> int:
    """The header reads in chunks of 1000, as prepare submits them."""
    chunks = [paths[i:i + 1000] for i in range(0, len(paths), 1000)]
    with pool:
        return sum(pool.map(read_chunk, chunks))


def prepare_end_to_end(work: Path, workers: int) -> tuple[float, list[str], str]:
    """prepare_voxceleb.py as a user runs it (--overwrite: the tree may have changed): (seconds, argv, last line)."""
    argv = ["--voxceleb2", str(work / "vox2"), "--out", str(work / "data"), "--workers", str(workers), "--overwrite"]
    tic = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "prepare_voxceleb.py"), *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - tic
    if result.returncode != 0:
        sys.exit(f"prepare_voxceleb.py failed: {result.stderr.strip()[-2000:]}")
    return seconds, argv, result.stdout.strip().splitlines()[-1]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/manifest_bench"), help="scratch folder (kept)")
    parser.add_argument("--files", type=int, default=100_000, help="m4a entries in the tree")
    parser.add_argument("--sources", type=int, default=8, help="distinct real m4a files the tree links to")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="header-read workers to try")
    parser.add_argument("--main-workers", type=int, default=8, help="--workers for the end-to-end prepare run")
    args = parser.parse_args()
    if args.files < 6 * VIDEOS * UTTS:  # prepare holds out 2 test and 2 valid speakers and trains on the rest
        parser.error(f"--files must be at least {6 * VIDEOS * UTTS} (6 speakers of {VIDEOS * UTTS} files)")
    if not REAL_MINI.is_dir():
        sys.exit(f"{REAL_MINI}: real speech folder not found (the shared data sits in ../shared/data beside the checkout)")
    return args


def main():
    args = parse_args()
    work = args.work.resolve()
    aac = work / "vox2" / "dev" / "aac"
    build_s, _ = timed(lambda: make_tree(aac, args.files, make_sources(work / "sources", args.sources)))
    print(f"[manifest] tree of {args.files:,} files under {aac} ready in {build_s:.1f} s", flush=True)

    rows = []  # (stage, workers, seconds)
    scan_s, paths = timed(lambda: walk(aac))
    assert len(paths) == args.files, f"the walk found {len(paths)} of {args.files} files"
    rows.append(("scan (directory walk)", "", scan_s))
    for kind, pool in (("threads (prepare)", ThreadPoolExecutor), ("processes", ProcessPoolExecutor)):
        for workers in args.workers:
            seconds, usable = timed(lambda: read_headers(paths, pool(workers)))
            assert usable == args.files, "every linked file has a readable header"
            rows.append((f"m4a headers, {kind}", workers, seconds))
            print(f"[manifest] headers, {workers} {kind}: {seconds:.1f} s", flush=True)
    total_s, argv, last_line = prepare_end_to_end(work, args.main_workers)
    rows.append(("prepare end to end: scan, headers, splits, trials, manifest", args.main_workers, total_s))
    manifest_lines = sum(1 for _ in open(work / "data" / "utterances.csv")) - 1
    assert manifest_lines == args.files, last_line

    print(f"\n## bench_manifest: VoxCeleb2-shaped tree of {args.files:,} m4a files, "
          f"{os.cpu_count()} CPUs, av {av.__version__} (FFmpeg {av.ffmpeg_version_info})\n")
    print("| stage | workers | seconds | files/s | projected for 1M files |")
    print("|---|---|---|---|---|")
    for stage, workers, seconds in rows:
        rate = args.files / seconds
        projected = 1e6 / rate
        print(f"| {stage} | {workers} | {seconds:.2f} | {rate:,.0f} | {projected:,.0f} s ({projected / 60:.1f} min) |")
    print(f"\ncommand: python prepare_voxceleb.py {' '.join(argv)}")
    print(last_line)


if __name__ == "__main__":
    main()
