"""VoxCeleb2: prepare --voxceleb2 (alone, with --voxceleb1, --convert-to), reading AAC .m4a, training on it.

The corpus is real speech (LibriSpeech speakers of ../shared/data/real-mini) encoded to AAC with
PyAV in VoxCeleb2's ROOT/dev/aac/<speaker>/<video>/<utterance>.m4a layout.
"""
import csv
import fractions
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

import prepare_voxceleb as prep
from asv.audio import AudioError, load_audio
from conftest import REAL_MINI, REPO, need

SR = 16000
LIBRI = ["1688", "1998", "2033", "2414", "2609", "3005"]  # 16 kHz read speech, one speaker each
CORRUPT = "id00001/videoA/00009.m4a"


def encode_m4a(path, audio, faststart=False):
    """AAC in an mp4 container, as VoxCeleb2 ships it. Giving the first frame a pts makes the muxer
    write the edit list that tells decoders to drop the encoder's 1024 priming samples."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "+faststart"} if faststart else {}  # faststart: header before the audio
    with av.open(str(path), "w", format="mp4", options=options) as container:
        stream = container.add_stream("aac", rate=SR, layout="mono")
        frame = av.AudioFrame.from_ndarray(audio[None, :].astype(np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = SR, 0, fractions.Fraction(1, SR)
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


@pytest.fixture(scope="module")
def vox2(tmp_path_factory):
    """ROOT/dev/aac: 6 speakers x 2 videos x 2 utterances of 1.6-2.5 s, and one corrupt file.
    Returns (root, {id: the source samples})."""
    need(REAL_MINI)
    root = tmp_path_factory.mktemp("vox2") / "VoxCeleb2"
    sources = {}
    for s, speaker in enumerate(LIBRI):
        for k, flac in enumerate(sorted((REAL_MINI / speaker).glob("*/*.flac"))[:4]):
            audio, _ = sf.read(flac, dtype="float32")
            audio = audio[SR // 2: SR // 2 + int((1.6 + 0.3 * k) * SR)]  # past the leading silence
            utt = f"id0000{s + 1}/video{'AB'[k // 2]}/0000{k % 2 + 1}.m4a"
            encode_m4a(root / "dev" / "aac" / utt, audio)
            sources[utt] = audio
    (root / "dev" / "aac" / CORRUPT).write_bytes(np.random.default_rng(0).bytes(3000))
    return root, sources


def prepare(*args):
    result = subprocess.run([sys.executable, "prepare_voxceleb.py", *map(str, args)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def prepared(vox2, tmp_path_factory):
    """prepare --voxceleb2 ROOT alone, 2 valid speakers (auto would give none here): (output folder, its stdout)."""
    out = tmp_path_factory.mktemp("prepared") / "data"
    return out, prepare("--voxceleb2", vox2[0], "--out", out, "--valid-speakers", 2)


def manifest(out):
    with open(out / "utterances.csv", newline="") as f:
        return list(csv.DictReader(f))


def trials(out, name, rows):
    """A trial list's rows, checked: utterance ids of the manifest, and the label says 'same speaker'."""
    speaker = {r["id"]: r["speaker"] for r in rows}
    lines = [line.split() for line in (out / "trials" / f"{name}.txt").read_text().splitlines()]
    assert lines
    for label, enroll, test in lines:
        assert label == ("1" if speaker[enroll] == speaker[test] else "0")
    return lines


def skipped(out):
    return dict(line.split("\t") for line in (out / "skipped.txt").read_text().splitlines())


def correlation(a, b):
    return float(np.corrcoef(a, b)[0, 1])


# ---------------------------------------------------------------- prepare --voxceleb2
def test_voxceleb2_alone(vox2, prepared):
    root, sources = vox2
    out, stdout = prepared
    assert "prepared 24 utterances of 6 speakers (train 8 / valid 8 / test 8); skipped 1 files" in stdout
    rows = manifest(out)
    aac = (root / "dev" / "aac").resolve()
    assert [r["id"] for r in rows] == sorted(sources)
    for r in rows:
        assert r["path"] == str(aac / r["id"]) and r["speaker"] == r["id"].split("/")[0]
        # tolerance: AAC priming/padding is trimmed to the sample count to ~1 ms
        assert float(r["duration"]) == pytest.approx(len(sources[r["id"]]) / SR, abs=1e-3)
        assert r["sample_rate"] == "16000"
    # no official trials: test and validation speakers are held out of the pool, as with --corpus
    split_of = {r["speaker"]: r["split"] for r in rows}
    assert Counter(split_of.values()) == {"train": 2, "valid": 2, "test": 2}
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["test.txt", "valid.txt"]
    for name in ("test", "valid"):
        ids = {u for t in trials(out, name, rows) for u in t[1:]}
        assert {split_of[u.split("/")[0]] for u in ids} == {name}
    assert skipped(out)[str(aac / CORRUPT)].startswith("unreadable: Invalid data found")


def test_voxceleb2_layouts(tmp_path):
    for layout, audio_dir in (("a", "dev/aac"), ("b", "aac"), ("c", "")):
        (tmp_path / layout / audio_dir / "id00012" / "21Uxsk56VDQ").mkdir(parents=True)
        assert prep.voxceleb2_dirs(tmp_path / layout) == [tmp_path / layout / audio_dir]
    with pytest.raises(SystemExit, match="is this a VoxCeleb2 root"):
        prep.voxceleb2_dirs(tmp_path / "a" / "dev" / "aac" / "id00012")  # a speaker folder, not a root


def test_voxceleb2_argument_errors(vox2, tmp_path, capsys):
    for argv, problem in ((["--voxceleb2", "a", "--corpus", "b"], "--voxceleb2 combines with --voxceleb1 only"),
                          ([], "error: one of --voxceleb1, --voxceleb2, --corpus")):  # ... is required
        with pytest.raises(SystemExit):
            prep.parse_args([*argv, "--out", str(tmp_path)])
        assert problem in capsys.readouterr().err
    inside = vox2[0] / "dev" / "aac" / "flac"
    with pytest.raises(SystemExit, match="--convert-to must be outside the corpus"):
        prep.main(["--voxceleb2", str(vox2[0]), "--out", str(tmp_path), "--convert-to", str(inside)])
    assert not inside.exists()


def test_voxceleb2_with_voxceleb1(vox2, tmp_path):
    """VoxCeleb1 dev speakers join VoxCeleb2's for training; VoxCeleb1's test speakers give the trials."""
    root1 = tmp_path / "VoxCeleb1"
    for s, speaker in enumerate(["19", "26", "27", "3080"]):
        wav = root1 / ("test" if s < 2 else "dev") / "wav" / f"id1000{s + 1}"
        for k, flac in enumerate(sorted((REAL_MINI / speaker).glob("*/*.flac"))[:4]):
            path = wav / f"vid{k // 2}" / f"0000{k % 2 + 1}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, sf.read(flac, frames=int(1.5 * SR))[0], SR, subtype="PCM_16")
    (root1 / "veri_test2.txt").write_text("1 id10001/vid0/00001.wav id10001/vid1/00002.wav\n"
                                          "0 id10001/vid0/00001.wav id10002/vid0/00001.wav\n")
    out = tmp_path / "out"
    prepare("--voxceleb2", vox2[0], "--voxceleb1", root1, "--out", out)

    rows = manifest(out)
    assert len(rows) == len({r["id"] for r in rows}) == 24 + 16
    split_of = {r["speaker"]: r["split"] for r in rows}
    assert {s for s, split in split_of.items() if split == "test"} == {"id10001", "id10002"}
    pool = {s for s, split in split_of.items() if split in ("train", "valid")}
    assert pool == {f"id0000{s}" for s in range(1, 7)} | {"id10003", "id10004"}
    assert Counter(split_of.values()) == {"test": 2, "valid": 2, "train": 6}
    assert {Path(r["path"]).suffix for r in rows if r["speaker"] in pool} == {".m4a", ".wav"}
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["valid.txt", "vox1-O-clean.txt"]
    assert len(trials(out, "vox1-O-clean", rows)) == 2


# ---------------------------------------------------------------- load_audio on m4a
def test_load_audio_reads_m4a(vox2):
    root, sources = vox2
    utt = "id00002/videoB/00002.m4a"
    path, source = str(root / "dev" / "aac" / utt), sources[utt]
    wav = load_audio(path, SR)
    assert wav.dtype.is_floating_point and wav.shape == (len(source),)  # priming and end padding removed
    # tolerance: AAC at 128 kb/s is lossy (SNR > 20 dB gives correlation > 0.99)
    assert correlation(wav.numpy(), source) > 0.99  # AAC is lossy: close, not equal
    crop = load_audio(path, SR, start_secs=0.5, num_secs=1.0)
    assert crop.shape == (SR,)
    # tolerance: AAC at 128 kb/s is lossy (SNR > 20 dB gives correlation > 0.99)
    assert correlation(crop.numpy(), source[SR // 2: SR // 2 + SR]) > 0.99
    assert load_audio(path, 8000, start_secs=0.5, num_secs=1.0).shape == (8000,)
    tail = load_audio(path, SR, start_secs=len(source) / SR - 0.25, num_secs=1.0)
    assert tail.shape == (SR // 4,)  # a crop past the end stops at the end, as for wav


def test_bad_m4a_is_a_one_line_audio_error(vox2, tmp_path):
    corrupt = vox2[0] / "dev" / "aac" / CORRUPT
    for path, problem in ((corrupt, "unreadable audio (Invalid data found"),
                          (tmp_path / "missing.m4a", "no such file")):
        with pytest.raises(AudioError) as error:
            load_audio(str(path), SR)
        assert str(error.value).startswith(f"{path}: {problem}") and "\n" not in str(error.value)
    silent = tmp_path / "silent.m4a"
    encode_m4a(silent, np.zeros(SR, np.float32))
    with pytest.raises(AudioError, match=f"^{silent}: silent"):
        load_audio(str(silent), SR)


# ---------------------------------------------------------------- --convert-to
def test_convert_to_flac_is_resumable(vox2, tmp_path):
    root, flac_dir, out = tmp_path / "VoxCeleb2", tmp_path / "flac", tmp_path / "out"
    shutil.copytree(vox2[0], root)
    aac = root / "dev" / "aac"
    # its header is intact (written first) but the audio is cut: only decoding finds out
    cut = aac / "id00003" / "videoA" / "00003.m4a"
    encode_m4a(cut, vox2[1]["id00003/videoA/00001.m4a"], faststart=True)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size * 2 // 3])
    # a half-written file left by a killed run
    leftover = flac_dir / "id00002" / "videoA" / "00001.flac.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a file")

    stdout = prepare("--voxceleb2", root, "--out", out, "--convert-to", flac_dir, "--workers", 2)
    assert "converted 24 m4a files" in stdout and "0 converted by an earlier run, 1 failed" in stdout
    rows = manifest(out)
    assert len(rows) == 24 and not list(flac_dir.rglob("*.tmp"))
    for r in rows:
        assert r["id"].endswith(".m4a")  # ids stay the corpus's; the audio is the FLAC copy
        assert r["path"] == str(flac_dir.resolve() / r["id"].replace(".m4a", ".flac"))
        info = sf.info(r["path"])
        assert (info.format, info.samplerate, info.frames) == ("FLAC", SR, round(float(r["duration"]) * SR))
    assert all(u.endswith(".m4a") for t in trials(out, "test", rows) for u in t[1:])  # ids, not the FLAC paths
    first = rows[0]
    # tolerance: two decodes of one AAC file by two routes: lossy only once (correlation > 0.999)
    assert correlation(load_audio(first["path"], SR).numpy(), load_audio(str(aac / first["id"]), SR).numpy()) > 0.999
    reasons = skipped(out)
    assert reasons[str(cut.resolve())].startswith(("unreadable audio", "truncated"))
    assert reasons[str((aac / CORRUPT).resolve())].startswith("unreadable")

    # the same command on the finished preparation: nothing to do, nothing decoded
    mtimes = {p: p.stat().st_mtime_ns for p in flac_dir.rglob("*.flac")}
    assert "nothing to do" in prepare("--voxceleb2", root, "--out", out, "--convert-to", flac_dir)
    # a run killed while converting left no preparation and one FLAC file short: the same command
    # decodes that one only
    shutil.rmtree(out)
    Path(first["path"]).unlink()
    stdout = prepare("--voxceleb2", root, "--out", out, "--convert-to", flac_dir)
    assert "converted 1 m4a files" in stdout and "23 converted by an earlier run" in stdout
    assert Path(first["path"]).is_file() and manifest(out) == rows
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if str(p) != first["path"])


# ---------------------------------------------------------------- training
def test_training_reads_m4a(prepared, tmp_path):
    """A few steps of the demo recipe on the m4a manifest: random crops, validation and test on AAC."""
    out, exp = prepared[0], tmp_path / "exp"
    result = subprocess.run(
        [sys.executable, "train_asv.py", "--config", "configs/demo.yaml", f"data.dir={out}", f"exp_dir={exp}",
         "num_workers=0", "data.batch_size=4", "train.total_steps=4", "train.log_step=2", "train.eval_step=4",
         "train.save_step=4"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "step 4 | loss" in result.stdout
    metrics = json.loads((exp / "step-4" / "eval" / "test" / "metrics.json").read_text())
    assert metrics["num_trials"] == len((out / "trials" / "test.txt").read_text().splitlines())


def test_bench_manifest_tiny(real_mini, tmp_path):
    """The manifest benchmark runs at a tiny size and prints its table (no timing assertions)."""
    result = subprocess.run([sys.executable, "benchmarks/bench_manifest.py", "--work", str(tmp_path), "--files", "1104",
                             "--sources", "2", "--workers", "1", "2"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.strip("|").split("|") for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    assert [r[0].strip() for r in rows] == ["scan (directory walk)", *["m4a headers, threads (prepare)"] * 2,
                                           *["m4a headers, processes"] * 2, "prepare end to end: scan, headers, "
                                           "splits, trials, manifest"]
    for row in rows:
        assert float(row[3].replace(",", "")) > 0  # files/s
    assert "prepared 1104 utterances of 6 speakers" in result.stdout
    assert "--overwrite" in result.stdout  # a second run on another tree size redoes the preparation
