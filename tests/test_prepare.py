"""Tests for prepare_voxceleb.py: the CLI on tiny corpora, plus a few unit checks."""
import csv
import gzip
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
REAL_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-mini"
sys.path.insert(0, str(REPO))
import prepare_voxceleb as prep  # noqa: E402


# ---------------------------------------------------------------- helpers
def write_audio(path, secs, sr=16000, seed=0):
    """A tone plus noise; .flac or .wav by the file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = np.arange(int(secs * sr)) / sr
    audio = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.05 * rng.standard_normal(len(t))
    sf.write(path, audio, sr, subtype="PCM_16")


def make_corpus(root, speakers=12, sessions=2, utts=3):
    """speaker/session/utterance tree of 0.5-1.5 s clips, mixing wav and flac."""
    rng = random.Random(0)
    for s in range(speakers):
        for v in range(sessions):
            for u in range(utts):
                ext = "flac" if (s + u) % 2 else "wav"
                path = root / f"spk{s:02d}" / f"sess{v}" / f"u{u}.{ext}"
                write_audio(path, rng.uniform(0.5, 1.5), seed=s * 100 + v * 10 + u)
    return root


def run(*args):
    """Run the script as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "prepare_voxceleb.py", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def read_manifest(out):
    with open(out / "utterances.csv", newline="") as f:
        return list(csv.DictReader(f))


def read_trials(path):
    return [line.split() for line in Path(path).read_text().splitlines()]


def check_trial_list(path, rows, balanced=True):
    """Labels say 'same speaker', paths are absolute manifest paths that exist; returns the trials."""
    speaker = {r["path"]: r["speaker"] for r in rows}
    trials = read_trials(path)
    assert trials, f"{path} is empty"
    for label, enroll, test in trials:
        assert os.path.isabs(enroll) and os.path.isabs(test)
        assert enroll in speaker and test in speaker  # the same strings as the manifest's path column
        assert Path(enroll).is_file() and Path(test).is_file()
        assert label == ("1" if speaker[enroll] == speaker[test] else "0")
    if balanced:
        counts = Counter(t[0] for t in trials)
        assert counts["1"] == counts["0"] > 0
        assert len({(e, t) for _, e, t in trials}) == len(trials)  # no pair twice
    return trials


# ---------------------------------------------------------------- --corpus
def test_corpus_without_trials(tmp_path):
    corpus, out = make_corpus(tmp_path / "corpus"), tmp_path / "out"
    result = run("--corpus", corpus, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "prepared 72 utterances of 12 speakers (train 48 / valid 12 / test 12); skipped 0 files" in result.stdout

    rows = read_manifest(out)
    assert list(rows[0]) == ["id", "path", "speaker", "duration", "sample_rate", "split"]
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    for r in rows:
        assert r["id"] == Path(r["path"]).relative_to(corpus.resolve()).as_posix()
        assert r["speaker"] == r["id"].split("/")[0]
        info = sf.info(r["path"])
        assert float(r["duration"]) == pytest.approx(info.frames / info.samplerate, abs=1e-4)
        assert int(r["sample_rate"]) == 16000
    split_of = {}
    for r in rows:  # every speaker in exactly one split
        assert split_of.setdefault(r["speaker"], r["split"]) == r["split"]
    assert Counter(split_of.values()) == {"train": 8, "valid": 2, "test": 2}

    speakers = [line.split() for line in (out / "speakers.txt").read_text().splitlines()]
    assert speakers == [[s, split_of[s], "6"] for s in sorted(split_of)]
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["test.txt", "valid.txt"]
    for name in ("test", "valid"):
        trials = check_trial_list(out / "trials" / f"{name}.txt", rows)
        used = {r["split"] for r in rows for t in trials if r["path"] in t[1:]}
        assert used == {name}
        assert len(trials) == 2 * 2 * 15  # 2 speakers x C(6,2) target pairs, as many non-target
    assert (out / "skipped.txt").read_text() == ""


def test_corpus_max_trials_and_seed(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert run("--corpus", corpus, "--out", tmp_path / name, "--max-trials", 10, "--seed", seed).returncode == 0
    trials = [(tmp_path / n / "trials" / "test.txt").read_text() for n in "abc"]
    assert trials[0] == trials[1]
    assert Counter(line.split()[0] for line in trials[0].splitlines()) == {"1": 5, "0": 5}
    assert (tmp_path / "a" / "utterances.csv").read_text() != (tmp_path / "c" / "utterances.csv").read_text()


def test_corpus_with_trials_and_rerun(tmp_path):
    corpus, out = make_corpus(tmp_path / "corpus"), tmp_path / "out"
    assert run("--corpus", corpus, "--out", out).returncode == 0  # leaves a generated test.txt
    trial_file = tmp_path / "my_trials.txt"
    trial_file.write_text("1 spk03/sess0/u0.flac spk03/sess1/u2.flac\n"
                          "0 spk03/sess0/u0.flac ./spk07/sess1/u1.wav\n"
                          "nontarget spk07/sess0/u0.flac spk09/sess0/u1.wav\n")
    result = run("--corpus", corpus, "--out", out, "--trials", trial_file)
    assert result.returncode == 0, result.stderr

    rows = read_manifest(out)
    split_of = {r["speaker"]: r["split"] for r in rows}
    assert {s for s, split in split_of.items() if split == "test"} == {"spk03", "spk07", "spk09"}
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["my_trials.txt", "valid.txt"]  # old test.txt gone
    trials = check_trial_list(out / "trials" / "my_trials.txt", rows, balanced=False)
    root = corpus.resolve()
    assert trials[1] == ["0", str(root / "spk03/sess0/u0.flac"), str(root / "spk07/sess1/u1.wav")]
    check_trial_list(out / "trials" / "valid.txt", rows)


def test_too_few_speakers_is_a_clear_error(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", speakers=5)
    result = run("--corpus", corpus, "--out", tmp_path / "out")
    assert result.returncode != 0
    assert "training speakers" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- --voxceleb1
def make_voxceleb(root, layout):
    """Seven speakers, id10001-3 are test speakers; official trial lists in root."""
    for s in range(1, 8):
        wav = root / "wav" if layout == "wav" else root / ("test" if s <= 3 else "dev") / "wav"
        for video in ("vidA", "vidB"):
            for u in range(1, 3):
                write_audio(wav / f"id1000{s}" / video / f"0000{u}.wav", 0.6, seed=s * 10 + u)
    (root / "veri_test2.txt").write_text("1 id10001/vidA/00001.wav id10001/vidB/00002.wav\n"
                                         "0 id10001/vidA/00001.wav id10002/vidA/00001.wav\n")
    with gzip.open(root / "list_test_hard.txt.gz", "wt") as f:
        f.write("target id10002/vidA/00001.wav id10002/vidB/00001.wav\n"
                "nontarget id10002/vidA/00001.wav id10003/vidB/00002.wav\n")


@pytest.mark.parametrize("layout", ["wav", "dev+test"])
def test_voxceleb1_layouts(tmp_path, layout):
    root, out = tmp_path / "vox1", tmp_path / "out"
    make_voxceleb(root, layout)
    # found in ROOT: only the -O lists (E/H name every VoxCeleb1 speaker, leaving nothing to train on)
    result = run("--voxceleb1", root, "--out", out)
    assert result.returncode == 0, result.stderr
    rows = read_manifest(out)
    split_of = {r["speaker"]: r["split"] for r in rows}
    assert {s for s, split in split_of.items() if split == "test"} == {"id10001", "id10002"}
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["valid.txt", "vox1-O-clean.txt"]
    # named with --trials, -H counts too
    result = run("--voxceleb1", root, "--out", out, "--trials", root / "veri_test2.txt", root / "list_test_hard.txt.gz")
    assert result.returncode == 0, result.stderr
    rows = read_manifest(out)
    assert len(rows) == 28 and rows[0]["id"] == "id10001/vidA/00001.wav"
    split_of = {r["speaker"]: r["split"] for r in rows}
    assert {s for s, split in split_of.items() if split == "test"} == {"id10001", "id10002", "id10003"}
    assert Counter(split_of.values()) == {"test": 3, "valid": 2, "train": 2}
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["valid.txt", "vox1-H.txt", "vox1-O-clean.txt"]
    hard = check_trial_list(out / "trials" / "vox1-H.txt", rows, balanced=False)
    assert [t[0] for t in hard] == ["1", "0"]  # target/nontarget read as 1/0


def test_voxceleb1_explicit_trials_and_missing_lists(tmp_path):
    root = tmp_path / "vox1"
    make_voxceleb(root, "wav")
    other = tmp_path / "lists" / "veri_test.txt"
    other.parent.mkdir()
    other.write_text((root / "veri_test2.txt").read_text())
    for official in ("veri_test2.txt", "list_test_hard.txt.gz"):
        (root / official).unlink()
    result = run("--voxceleb1", root, "--out", tmp_path / "out")
    assert result.returncode != 0 and "no trial list found" in result.stderr
    result = run("--voxceleb1", root, "--out", tmp_path / "out", "--trials", other)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "trials" / "vox1-O.txt").is_file()


# ---------------------------------------------------------------- bad input
def test_bad_files_are_skipped_not_fatal(tmp_path):
    corpus, out = make_corpus(tmp_path / "corpus"), tmp_path / "out"
    (corpus / "spk00" / "sess0" / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(2000))
    sf.write(corpus / "spk00" / "sess0" / "empty.wav", np.zeros(0), 16000, subtype="PCM_16")
    write_audio(corpus / "spk01" / "sess0" / "short.wav", 0.12)
    write_audio(corpus / "spk01" / "sess0" / "two words.wav", 1.0)  # would break 'label enroll test'
    (corpus / "spk01" / "sess0" / "notes.txt").write_text("not audio")  # other extensions are ignored
    write_audio(corpus / "spk01" / "deeper" / "x" / "y.wav", 1.0)  # not speaker/session/utterance
    trial_file = tmp_path / "t.txt"
    trial_file.write_text("1 spk01/sess0/short.wav spk01/sess0/u0.flac\n1 spk01/sess0/u0.flac spk01/sess1/u0.flac\n")
    result = run("--corpus", corpus, "--out", out, "--trials", trial_file)
    assert result.returncode == 0, result.stderr
    assert "skipped 4 files; dropped 1 trials naming skipped files" in result.stdout
    assert result.stderr == ""

    reasons = dict(line.split("\t") for line in (out / "skipped.txt").read_text().splitlines())
    root = corpus.resolve()
    assert reasons[str(root / "spk00/sess0/corrupt.wav")].startswith("unreadable: ")
    assert reasons[str(root / "spk00/sess0/empty.wav")] == "empty: 0 frames"
    assert reasons[str(root / "spk01/sess0/short.wav")] == "too short (0.1200 s < 0.3 s)"
    assert reasons[str(root / "spk01/sess0/two words.wav")].startswith("name contains whitespace")
    assert reasons[str(trial_file)] == "line 1 dropped: spk01/sess0/short.wav was skipped"
    ids = {r["id"] for r in read_manifest(out)}
    assert len(ids) == 72 and not any(bad in i for i in ids for bad in ("corrupt", "empty", "short", "words"))
    assert len(read_trials(out / "trials" / "t.txt")) == 1


@pytest.mark.parametrize("line, problem", [
    ("1 spk00/sess0/u0.wav spk00/sess0/missing.wav", "spk00/sess0/missing.wav not found"),
    ("1 spk00/sess0/u0.wav", "expected 'label enroll test', got 2 fields"),
    ("yes spk00/sess0/u0.wav spk00/sess0/u1.flac", "bad label 'yes'"),
    ("0 spk00/sess0/u0.wav ../elsewhere/sess0/u0.wav", "../elsewhere/sess0/u0.wav is outside the corpus root"),
    ("0 spk00/sess0/u0.wav /etc/passwd", "/etc/passwd is outside the corpus root"),
])
def test_bad_trial_lines_are_clear_errors(tmp_path, line, problem):
    corpus = make_corpus(tmp_path / "corpus")
    trial_file = tmp_path / "trials.txt"
    trial_file.write_text("1 spk00/sess0/u0.wav spk00/sess1/u0.wav\n" + line + "\n")
    result = run("--corpus", corpus, "--out", tmp_path / "out", "--trials", trial_file)
    assert result.returncode != 0
    assert f"{trial_file}:2: {problem}" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- --demo
@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """Two --demo runs into different folders (about 10 s each)."""
    outs = [tmp_path_factory.mktemp("demo") / "out" for _ in range(2)]
    for out in outs:
        result = run("--demo", "--out", out)
        assert result.returncode == 0, result.stderr
        assert "prepared 480 utterances of 40 speakers" in result.stdout
    return outs


def test_demo_is_deterministic(demo_runs):
    a, b = demo_runs
    csv_a = (a / "utterances.csv").read_text().replace(str(a.resolve()), "OUT")
    csv_b = (b / "utterances.csv").read_text().replace(str(b.resolve()), "OUT")
    assert csv_a == csv_b and "OUT/corpus/spk00/sess0/utt0.wav" in csv_a
    for name in ("spk00/sess0/utt0.wav", "spk39/sess2/utt3.wav"):
        assert (a / "corpus" / name).read_bytes() == (b / "corpus" / name).read_bytes()
    info = sf.info(a / "corpus" / "spk00" / "sess0" / "utt0.wav")
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    assert 2.0 <= info.duration <= 4.0
    rows = read_manifest(a)
    check_trial_list(a / "trials" / "test.txt", rows)
    check_trial_list(a / "trials" / "valid.txt", rows)


def log_spectrum(path):
    """Mean log power spectrum of an utterance (512-point frames), level removed."""
    audio, _ = sf.read(path)
    frames = audio[: len(audio) // 512 * 512].reshape(-1, 512) * np.hanning(512)
    spectrum = np.log(np.mean(np.abs(np.fft.rfft(frames)) ** 2, axis=0) + 1e-10)
    return spectrum - spectrum.mean()  # the demo draws a random level per utterance


def test_demo_speakers_really_differ(demo_runs):
    corpus = demo_runs[0] / "corpus"
    spectra = {(s, v): [log_spectrum(corpus / f"spk{s:02d}" / f"sess{v}" / f"utt{u}.wav") for u in range(4)]
               for s in range(10) for v in range(3)}
    same, different = [], []
    for (s1, v1), x in spectra.items():
        for (s2, v2), y in spectra.items():
            if (s1, v1) < (s2, v2) and v1 != v2:  # across sessions, so a shared channel cannot explain it
                distance = np.mean([np.linalg.norm(a - b) for a in x for b in y])
                (same if s1 == s2 else different).append(distance)
    assert np.mean(same) < 0.9 * np.mean(different)  # about 0.72 with the default seed


# ---------------------------------------------------------------- real data
def test_real_mini(tmp_path):
    out = tmp_path / "out"
    result = run("--corpus", REAL_MINI, "--out", out)
    assert result.returncode == 0, result.stderr
    rows = read_manifest(out)
    assert len({r["speaker"] for r in rows}) == 19
    assert {r["sample_rate"] for r in rows} == {"8000", "16000"}
    assert {Path(r["path"]).suffix for r in rows} == {".wav", ".flac"}
    assert min(float(r["duration"]) for r in rows) >= 0.3
    skipped = dict(line.split("\t") for line in (out / "skipped.txt").read_text().splitlines())
    fsdd = {"george", "jackson", "lucas", "nicolas", "theo", "yweweler"}
    assert len(skipped) == 48 and len(rows) + len(skipped) == 412  # short FSDD digits, nothing else
    for path, reason in skipped.items():
        assert Path(path).relative_to(REAL_MINI.resolve()).parts[0] in fsdd
        assert reason.startswith("too short (") and sf.info(path).duration < 0.3
    check_trial_list(out / "trials" / "test.txt", rows)
    check_trial_list(out / "trials" / "valid.txt", rows)


# ---------------------------------------------------------------- units
def test_trial_list_names():
    assert prep.trial_list_name("a/veri_test.txt") == "vox1-O"
    assert prep.trial_list_name("veri_test2.txt") == "vox1-O-clean"
    assert prep.trial_list_name("list_test_all.txt.gz") == "vox1-E"
    assert prep.trial_list_name("list_test_hard2.txt") == "vox1-H-clean"
    assert prep.trial_list_name("/x/my-list.txt.gz") == "my-list"


def test_trial_id_stays_inside_root(tmp_path):
    roots = [tmp_path / "wav"]
    assert prep.trial_id("a/b/c.wav", roots) == "a/b/c.wav"
    assert prep.trial_id("./a/../a/b/c.wav", roots) == "a/b/c.wav"
    assert prep.trial_id(str(tmp_path / "wav" / "a" / "b" / "c.wav"), roots) == "a/b/c.wav"
    assert prep.trial_id("../wav2/b/c.wav", roots) is None
    assert prep.trial_id(str(tmp_path / "wav2" / "b" / "c.wav"), roots) is None


def test_balanced_trials_unit():
    by_speaker = {s: [f"{s}/v/{u}.wav" for u in range(n)] for s, n in (("a", 5), ("b", 3), ("c", 2))}
    full = prep.balanced_trials(by_speaker, 10**6, random.Random(0))
    assert sum(t[0] for t in full) == 10 + 3 + 1  # every target pair
    capped = prep.balanced_trials(by_speaker, 8, random.Random(0))
    assert Counter(t[0] for t in capped) == {1: 4, 0: 4}
    assert capped == prep.balanced_trials(by_speaker, 8, random.Random(0))
    for trials in (full, capped):
        assert len({frozenset(t[1:]) for t in trials}) == len(trials)
        assert all(t[0] == (t[1].split("/")[0] == t[2].split("/")[0]) for t in trials)
    # Few different-speaker pairs: the list is balanced at the smaller count.
    lopsided = prep.balanced_trials({"a": by_speaker["a"], "c": by_speaker["c"]}, 100, random.Random(0))
    assert Counter(t[0] for t in lopsided) == {1: 10, 0: 10}


def test_help_lists_every_option():
    result = run("--help")
    assert result.returncode == 0
    for flag in ("--voxceleb1", "--corpus", "--demo", "--out", "--trials", "--test-speakers",
                 "--valid-speakers", "--min-secs", "--max-trials", "--seed", "--workers", "(default: 0.3)"):
        assert flag in result.stdout
