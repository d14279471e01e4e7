"""How fast prepare_voxceleb.py builds a VoxCeleb2 manifest: the scan, the m4a header reads, the rest.

    python benchmarks/bench_manifest.py --files 100000 --work /tmp/manifest_bench
    python benchmarks/bench_manifest.py --files 20000 --workers 1 2 4 8 16

1. A few real utterances (LibriSpeech speakers of ../shared/data/real-mini, cut to at most 8 s,
   VoxCeleb2's typical length) are encoded once to AAC .m4a with PyAV into WORK/sources.
2. WORK/vox2/dev/aac is a VoxCeleb2-shaped tree of --files entries, speaker/video/utterance.m4a with
   23 videos x 8 utterances per speaker (VoxCeleb2 dev: 1,092,009 files, 5,994 speakers, ~182 each),
   made of hard links to those sources: cheap to build, and each entry is a real file FFmpeg opens.
   It is kept and reused while --files stays the same.
3. Timed in this process with prepare's own functions: the directory scan; the header reads at each
   --workers count, with threads (what prepare uses) and with processes for comparison; then
   prepare's main() end to end (scan, headers, splits, trials, manifest) at --main-workers.
The 1M-file projections are linear. The hard links share a few inodes, so everything sits in the
page cache and these are CPU figures: a cold disk adds its latency per file (two reads each).
"""
from __future__ import annotations

import argparse
import fractions
import io
import itertools
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stdout
from pathlib import Path

import av
import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import prepare_voxceleb as prep  # noqa: E402

REAL_MINI = ROOT.parent / "shared" / "data" / "real-mini"
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


def read_chunk(paths: list[str]) -> list:
    return [prep.read_header(p, 0.3) for p in paths]


def headers_in_processes(files: dict, workers: int) -> int:
    """The same header reads as prepare.read_headers, in processes instead of threads."""
    paths = [files[u] for u in sorted(files)]
    chunks = [paths[i:i + 1000] for i in range(0, len(paths), 1000)]
    with ProcessPoolExecutor(workers) as pool:
        return sum(d is not None for d, _ in itertools.chain.from_iterable(pool.map(read_chunk, chunks)))


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/manifest_bench"), help="scratch folder (kept)")
    parser.add_argument("--files", type=int, default=100_000, help="m4a entries in the tree")
    parser.add_argument("--sources", type=int, default=8, help="distinct real m4a files the tree links to")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="header-read workers to try")
    parser.add_argument("--main-workers", type=int, default=8, help="--workers for the end-to-end prepare run")
    args = parser.parse_args()
    if args.files < 6 * VIDEOS * UTTS:  # prepare holds out 2 test and 2 valid speakers and trains on the rest
        parser.error(f"--files must be at least {6 * VIDEOS * UTTS} (6 speakers of {VIDEOS * UTTS} files)")

    aac = args.work / "vox2" / "dev" / "aac"
    build_s, _ = timed(lambda: make_tree(aac, args.files, make_sources(args.work / "sources", args.sources)))
    print(f"[manifest] tree of {args.files:,} files under {aac} ready in {build_s:.1f} s", flush=True)

    rows = []  # (stage, workers, seconds)
    scan_s, files = timed(lambda: prep.scan_tree(aac))
    assert len(files) == args.files, f"scan found {len(files)} of {args.files} files"
    rows.append(("scan (directory walk)", "", scan_s))
    for workers in args.workers:
        seconds, (usable, _) = timed(lambda: prep.read_headers(files, 0.3, workers))
        assert len(usable) == args.files, "every linked file has a readable header"
        rows.append(("m4a headers, threads (prepare)", workers, seconds))
        print(f"[manifest] headers, {workers} threads: {seconds:.1f} s", flush=True)
    for workers in args.workers:
        seconds, count = timed(lambda: headers_in_processes(files, workers))
        assert count == args.files
        rows.append(("m4a headers, processes", workers, seconds))
        print(f"[manifest] headers, {workers} processes: {seconds:.1f} s", flush=True)
    out = args.work / "data"
    argv = ["--voxceleb2", str(args.work / "vox2"), "--out", str(out), "--workers", str(args.main_workers)]
    with redirect_stdout(io.StringIO()) as log:
        total_s, _ = timed(lambda: prep.main(argv))
    rows.append(("prepare end to end: scan, headers, splits, trials, manifest", args.main_workers, total_s))
    manifest_lines = sum(1 for _ in open(out / "utterances.csv")) - 1
    assert manifest_lines == args.files, log.getvalue()

    print(f"\n## bench_manifest: VoxCeleb2-shaped tree of {args.files:,} m4a files, "
          f"{os.cpu_count()} CPUs, av {av.__version__} (FFmpeg {av.ffmpeg_version_info})\n")
    print("| stage | workers | seconds | files/s | projected for 1M files |")
    print("|---|---|---|---|---|")
    for stage, workers, seconds in rows:
        rate = args.files / seconds
        projected = 1e6 / rate
        print(f"| {stage} | {workers} | {seconds:.2f} | {rate:,.0f} | {projected:,.0f} s ({projected / 60:.1f} min) |")
    print(f"\ncommand: python prepare_voxceleb.py {' '.join(argv)}")
    print(log.getvalue().strip().splitlines()[-1])


if __name__ == "__main__":
    main()
