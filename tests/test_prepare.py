"""Tests for prepare_voxceleb.py: the CLI on tiny corpora, plus a few unit checks.

Most runs call prepare's main() in this process (a subprocess costs ~3 s of imports); the exit codes
and one-line errors a user sees are checked through the command itself.
"""
import csv
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import prepare_voxceleb as prep
from asv.demo import make_demo_speaker
from conftest import REPO


# ---------------------------------------------------------------- helpers
def write_audio(path, secs, sr=16000, seed=0, **kwargs):
    """A tone plus noise; the format follows the file name (.wav, .flac, .ogg, .mp3)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = np.arange(int(secs * sr)) / sr
    audio = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.05 * rng.standard_normal(len(t))
    sf.write(path, audio, sr, **({"subtype": "PCM_16"} if str(path).endswith((".wav", ".flac")) else {}), **kwargs)


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


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The 12-speaker corpus, shared read-only by the tests of this module (copy it to change it)."""
    return make_corpus(tmp_path_factory.mktemp("corpus") / "corpus").resolve()


def own_copy(corpus, tmp_path):
    return Path(shutil.copytree(corpus, tmp_path / "corpus"))


def prepare(*args, capsys=None):
    """prepare's main() in this process; returns what it printed when given capsys."""
    prep.main([str(a) for a in args])
    return capsys.readouterr().out if capsys else None


def cli(*args):
    """The script as a user runs it; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "prepare_voxceleb.py", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    return lines[0]


def read_manifest(out):
    with open(out / "utterances.csv", newline="") as f:
        return list(csv.DictReader(f))


def read_trials(path):
    return [line.split() for line in Path(path).read_text().splitlines()]


def read_skipped(out) -> dict:
    """path -> reason; a path written as a JSON string (a newline or a non-UTF-8 name in it) is decoded."""
    rows = {}
    for line in (out / "skipped.txt").read_text(encoding="utf-8").split("\n"):
        if line:
            path, reason = line.split("\t")
            rows[json.loads(path) if path.startswith('"') else path] = reason
    return rows


def snapshot(folder: Path) -> dict:
    """Every file under folder -> its bytes (a byte-identical check)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def check_trial_list(path, rows, balanced=True):
    """Entries are utterance ids of the manifest, labels say 'same speaker'; returns the trials."""
    speaker = {r["id"]: r["speaker"] for r in rows}
    trials = read_trials(path)
    assert trials, f"{path} is empty"
    for label, enroll, test in trials:
        assert enroll in speaker and test in speaker  # ids, as VoxCeleb's official lists hold them
        assert label == ("1" if speaker[enroll] == speaker[test] else "0")
    assert len({frozenset(t[1:]) for t in trials}) == len(trials)  # no pair twice
    if balanced:
        counts = Counter(t[0] for t in trials)
        assert counts["1"] == counts["0"] > 0
    return trials


def splits(rows) -> dict:
    split_of = {}
    for r in rows:  # every speaker in exactly one split
        assert split_of.setdefault(r["speaker"], r["split"]) == r["split"]
    return split_of


# ---------------------------------------------------------------- --corpus
def test_corpus_without_trials(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    printed = prepare("--corpus", corpus, "--out", out, capsys=capsys)
    # auto: 2 test speakers (10%, at least 2); valid max(4, 3%) but at most a third of the other 10: 3
    assert "prepared 72 utterances of 12 speakers (train 42 / valid 18 / test 12); skipped 0 files" in printed

    rows = read_manifest(out)
    assert list(rows[0]) == ["id", "path", "speaker", "duration", "sample_rate", "split"]
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    for r in rows:
        assert Path(r["path"]).is_absolute()  # the audio is outside the data folder
        assert r["id"] == Path(r["path"]).relative_to(corpus).as_posix()
        assert r["speaker"] == r["id"].split("/")[0]
        info = sf.info(r["path"])
        # tolerance: durations are written with 4 decimals
        assert float(r["duration"]) == pytest.approx(info.frames / info.samplerate, abs=1e-4)
        assert int(r["sample_rate"]) == 16000
    split_of = splits(rows)
    assert Counter(split_of.values()) == {"train": 7, "valid": 3, "test": 2}

    speakers = [line.split() for line in (out / "speakers.txt").read_text().splitlines()]
    assert speakers == [[s, split_of[s], "6"] for s in sorted(split_of)]
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["test.txt", "valid.txt"]
    test = check_trial_list(out / "trials" / "test.txt", rows)
    assert len(test) == 2 * 2 * 15  # 2 speakers x C(6,2) target pairs, as many non-target
    valid = check_trial_list(out / "trials" / "valid.txt", rows, balanced=False)
    assert len(valid) == 18 * 17 // 2  # every pair among the 18 valid utterances (< --max-valid-utts)
    for name, trials in (("test", test), ("valid", valid)):
        assert {split_of[u.split("/")[0]] for t in trials for u in t[1:]} == {name}
    assert (out / "skipped.txt").read_text() == ""
    record = json.loads((out / "prepare.json").read_text())
    assert record["arguments"]["corpus"] == str(corpus) and record["arguments"]["seed"] == 0
    assert (record["utterances"], record["train"], record["valid"], record["test"]) == (72, 42, 18, 12)
    assert record["trials"] == {"test": 60, "valid": 153}


def test_corpus_max_trials_and_seed(corpus, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare("--corpus", corpus, "--out", tmp_path / name, "--max-trials", 10, "--seed", seed)
    trials = [(tmp_path / n / "trials" / "test.txt").read_text() for n in "abc"]
    assert trials[0] == trials[1]
    assert Counter(line.split()[0] for line in trials[0].splitlines()) == {"1": 5, "0": 5}
    assert (tmp_path / "a" / "utterances.csv").read_text() != (tmp_path / "c" / "utterances.csv").read_text()


def test_valid_speakers_zero_and_max_valid_utts(corpus, tmp_path, capsys):
    none = tmp_path / "superb"
    printed = prepare("--corpus", corpus, "--out", none, "--valid-speakers", 0, capsys=capsys)
    assert "(train 60 / valid 0 / test 12)" in printed  # SUPERB's protocol: every non-test speaker trains
    assert sorted(p.name for p in (none / "trials").iterdir()) == ["test.txt"]
    capped = tmp_path / "capped"
    prepare("--corpus", corpus, "--out", capped, "--valid-speakers", 4, "--max-valid-utts", 10)
    rows = read_manifest(capped)
    assert Counter(splits(rows).values()) == {"train": 6, "valid": 4, "test": 2}
    valid = check_trial_list(capped / "trials" / "valid.txt", rows, balanced=False)
    used = {u for t in valid for u in t[1:]}
    assert len(used) == 10 and len(valid) == 45  # every pair among 10 utterances...
    assert Counter(u.split("/")[0] for u in used).most_common()[0][1] <= 3  # ...taken round-robin over 4 speakers
    with pytest.raises(SystemExit, match="--valid-speakers 1: a list of one speaker has no different-speaker"):
        prepare("--corpus", corpus, "--out", tmp_path / "one", "--valid-speakers", 1)  # training would fail on it
    with pytest.raises(SystemExit):
        prep.parse_args(["--corpus", str(corpus), "--out", str(tmp_path / "x"), "--max-valid-utts", "1"])
    assert "--max-valid-utts must be >= 2" in capsys.readouterr().err


def test_corpus_with_trials_refused_then_overwritten(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    prepare("--corpus", corpus, "--out", out)  # leaves a generated test.txt
    trial_file = tmp_path / "my_trials.txt"
    trial_file.write_text("1 spk03/sess0/u0.flac spk03/sess1/u2.flac\n"
                          "0 spk03/sess0/u0.flac ./spk07/sess1/u1.wav\n"
                          f"nontarget {corpus}/spk07/sess0/u0.flac spk09/sess0/u1.wav\n")
    before = snapshot(out)
    with pytest.raises(SystemExit, match=f"{out} holds another preparation: .* --overwrite"):
        prepare("--corpus", corpus, "--out", out, "--trials", trial_file)
    assert snapshot(out) == before and not list(tmp_path.glob(".out*"))
    prepare("--corpus", corpus, "--out", out, "--trials", trial_file, "--overwrite")

    rows = read_manifest(out)
    split_of = splits(rows)
    assert {s for s, split in split_of.items() if split == "test"} == {"spk03", "spk07", "spk09"}
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["my_trials.txt", "valid.txt"]  # old test.txt gone
    trials = check_trial_list(out / "trials" / "my_trials.txt", rows, balanced=False)
    # relative, ./-prefixed and absolute entries all become the corpus's utterance ids
    assert trials == [["1", "spk03/sess0/u0.flac", "spk03/sess1/u2.flac"],
                      ["0", "spk03/sess0/u0.flac", "spk07/sess1/u1.wav"],
                      ["0", "spk07/sess0/u0.flac", "spk09/sess0/u1.wav"]]
    check_trial_list(out / "trials" / "valid.txt", rows, balanced=False)
    assert list(json.loads((out / "prepare.json").read_text())["arguments"]["trials"]) == [str(trial_file)]


def test_same_arguments_are_a_no_op(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    prepare("--corpus", corpus, "--out", out, "--seed", 3)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    printed = prepare("--corpus", corpus, "--out", out, "--workers", 1, "--seed", 3, capsys=capsys)
    assert "already holds this preparation (same arguments" in printed  # --workers changes nothing
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    extra = corpus / "spk00" / "sess0" / "new.wav"  # the corpus gained a file: same arguments are no longer enough
    shutil.copy(next(corpus.glob("spk00/sess0/*.wav")), extra)
    try:
        with pytest.raises(SystemExit, match="prepared from .* files, the corpus now has .*--overwrite"):
            prepare("--corpus", corpus, "--out", out, "--seed", 3)
    finally:
        extra.unlink()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before and not list(tmp_path.glob(".out*"))
    prepare("--corpus", corpus, "--out", out, "--seed", 3, "--overwrite")  # redone on request
    assert (out / "utterances.csv").stat().st_mtime_ns != before[out / "utterances.csv"]


def test_other_arguments_and_foreign_folders_are_refused(corpus, tmp_path):
    out = tmp_path / "out"
    prepare("--corpus", corpus, "--out", out)
    one_line_error(cli("--corpus", corpus, "--out", out, "--seed", 1), out, "holds another preparation",
                   "--overwrite")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own files")
    for extra in ([], ["--overwrite"]):  # --overwrite replaces a preparation, never someone's folder
        with pytest.raises(SystemExit, match=f"{mine} holds files that are not a preparation"):
            prepare("--corpus", corpus, "--out", mine, *extra)
    assert sorted(os.listdir(mine)) == ["notes.txt"]


@pytest.mark.parametrize("change", ["moved to another speaker", "replaced by a shorter clip"])
def test_a_changed_corpus_with_the_same_file_count_is_not_nothing_to_do(corpus, tmp_path, change):
    corpus = own_copy(corpus, tmp_path)
    out = tmp_path / "out"
    prepare("--corpus", corpus, "--out", out)
    before = snapshot(out)
    if change == "moved to another speaker":
        os.replace(corpus / "spk00" / "sess0" / "u0.wav", corpus / "spk01" / "sess0" / "u9.wav")
    else:
        write_audio(corpus / "spk00" / "sess0" / "u0.wav", 0.5, seed=7)
    with pytest.raises(SystemExit, match="and they changed .*pass --overwrite"):
        prepare("--corpus", corpus, "--out", out)
    assert snapshot(out) == before
    prepare("--corpus", corpus, "--out", out, "--overwrite")
    assert snapshot(out) != before


def test_a_full_disk_is_one_line_and_the_old_preparation_stays(corpus, tmp_path, monkeypatch):
    import errno
    out = tmp_path / "out"
    prepare("--corpus", corpus, "--out", out)
    before = snapshot(out)

    def full(folder, *args):
        (folder / "utterances.csv").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "speakers.txt"))
    monkeypatch.setattr(prep, "write_outputs", full)
    with pytest.raises(SystemExit) as e:
        prepare("--corpus", corpus, "--out", out, "--seed", 1, "--overwrite")
    msg = str(e.value)
    assert "\n" not in msg and f"preparation of {out}" in msg and "No space left on device" in msg
    assert "GB free there" in msg and "left as it was" in msg
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_out_that_is_a_file_is_refused_and_kept(corpus, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit, match=f"{out}: is a file, not a folder"):
            prepare("--corpus", corpus, "--out", out, *extra)
    assert out.read_text() == "mine"


def test_a_failure_mid_prepare_leaves_the_previous_preparation_intact(corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare("--corpus", corpus, "--out", out)
    before = snapshot(out)

    def disk_full(folder, *args):  # the outputs are half written when the disk fills up
        (folder / "utterances.csv").write_text("id,path\n")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prep, "write_outputs", disk_full)
    with pytest.raises(SystemExit, match="No space left on device"):  # one line, not a traceback
        prepare("--corpus", corpus, "--out", out, "--seed", 1, "--overwrite")
    assert snapshot(out) == before
    monkeypatch.undo()

    # as a command: a trial list naming a missing file stops the run after the build folder was started
    bad = tmp_path / "bad.txt"
    bad.write_text("1 spk00/sess0/u0.wav spk00/sess0/nothing.wav\n")
    one_line_error(cli("--corpus", corpus, "--out", out, "--trials", bad, "--overwrite"), "nothing.wav not found")
    assert snapshot(out) == before
    # the leftover build folder is cleared by the next run, which then succeeds
    prepare("--corpus", corpus, "--out", out, "--seed", 1, "--overwrite")
    assert snapshot(out) != before and sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "out"]


def test_a_kill_between_the_two_renames_is_recovered(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    prepare("--corpus", corpus, "--out", out)
    before = snapshot(out)
    os.replace(out, tmp_path / "out.old")  # replace_dir moved the old folder aside, then the kill came
    printed = prepare("--corpus", corpus, "--out", out, capsys=capsys)
    assert "nothing to do" in printed and snapshot(out) == before and not (tmp_path / "out.old").exists()


def test_audio_inside_out_is_refused(corpus, tmp_path):
    out = tmp_path / "data"
    prepare("--corpus", corpus, "--out", out)
    shutil.copytree(corpus, out / "corpus")  # the swap would delete it with the old preparation
    with pytest.raises(SystemExit, match=f"{out}/corpus: audio must not live inside --out {out}"):
        prepare("--corpus", out / "corpus", "--out", out, "--overwrite")
    assert len(list((out / "corpus").rglob("*.*"))) == 72


def test_too_few_speakers_is_a_clear_error(corpus, tmp_path):
    small = tmp_path / "small"
    for s in range(3):
        shutil.copytree(corpus / f"spk{s:02d}", small / f"spk{s:02d}")
    one_line_error(cli("--corpus", small, "--out", tmp_path / "out"), "too few left for 0 valid and >= 2 training")
    with pytest.raises(SystemExit, match="too few left for 9 valid and >= 2 training speakers"):
        prepare("--corpus", corpus, "--out", tmp_path / "out", "--valid-speakers", 9)
    assert not (tmp_path / "out").exists()


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
    prepare("--voxceleb1", root, "--out", out)
    rows = read_manifest(out)
    split_of = splits(rows)
    assert {s for s, split in split_of.items() if split == "test"} == {"id10001", "id10002"}
    # auto: a third of the 5 other speakers is 1, and one speaker makes no different-speaker trials: no valid list
    assert Counter(split_of.values()) == {"test": 2, "train": 5}
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["vox1-O-clean.txt"]
    assert read_trials(out / "trials" / "vox1-O-clean.txt")[0] == ["1", "id10001/vidA/00001.wav",
                                                                   "id10001/vidB/00002.wav"]
    # named with --trials, -H counts too
    prepare("--voxceleb1", root, "--out", out, "--trials", root / "veri_test2.txt", root / "list_test_hard.txt.gz",
            "--valid-speakers", 2, "--overwrite")
    rows = read_manifest(out)
    assert len(rows) == 28 and rows[0]["id"] == "id10001/vidA/00001.wav"
    split_of = splits(rows)
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
    with pytest.raises(SystemExit, match="no trial list found"):
        prepare("--voxceleb1", root, "--out", tmp_path / "out")
    prepare("--voxceleb1", root, "--out", tmp_path / "out", "--trials", other)
    assert (tmp_path / "out" / "trials" / "vox1-O.txt").is_file()


# ---------------------------------------------------------------- bad input
def test_bad_files_are_skipped_with_a_reason(corpus, tmp_path):
    corpus, out = own_copy(corpus, tmp_path), tmp_path / "out"
    session = corpus / "spk00" / "sess0"
    (session / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(2000))
    sf.write(session / "empty.wav", np.zeros(0), 16000, subtype="PCM_16")
    write_audio(corpus / "spk01" / "sess0" / "short.wav", 0.12)
    write_audio(corpus / "spk01" / "sess0" / "two words.wav", 1.0)  # would break 'label enroll test'
    write_audio(session / "new\nline.wav", 1.0)  # a newline: skipped.txt must stay one line per entry
    (session / "notes.txt").write_text("not audio")
    nan = np.sin(np.arange(16000) / 10.0).astype(np.float32)
    nan[8000] = np.nan
    sf.write(session / "nan.wav", nan, 16000, subtype="FLOAT")  # would stop training later
    os.symlink("loop.wav", session / "loop.wav")  # a link to itself
    os.symlink(tmp_path / "gone.wav", session / "dangling.wav")
    not_utf8 = os.fsencode(session) + b"/caf\xe9.wav"  # a Latin-1 name
    with open(not_utf8, "wb") as f:
        f.write((session / "u0.wav").read_bytes())
    write_audio(corpus / "spk02" / "sess0" / "u9.ogg", 1.0)  # read through libsndfile now: not skipped
    write_audio(corpus / "spk02" / "sess0" / "u8.mp3", 1.0)
    trial_file = tmp_path / "t.txt"
    trial_file.write_text("1 spk01/sess0/short.wav spk01/sess0/u0.flac\n1 spk01/sess0/u0.flac spk01/sess1/u0.flac\n")
    result = cli("--corpus", corpus, "--out", out, "--trials", trial_file)
    assert result.returncode == 0, result.stderr
    assert "prepared 74 utterances" in result.stdout
    assert "skipped 10 files; dropped 1 trials naming skipped files" in result.stdout
    assert result.stderr == ""

    reasons = read_skipped(out)
    assert len((out / "skipped.txt").read_text(encoding="utf-8").splitlines()) == len(reasons) == 11
    assert reasons[f"{session}/corrupt.wav"].startswith("unreadable: ")
    assert reasons[f"{session}/empty.wav"] == "empty: 0 frames"
    assert reasons[f"{corpus}/spk01/sess0/short.wav"] == "too short (0.1200 s < 0.3 s)"
    assert reasons[f"{corpus}/spk01/sess0/two words.wav"].startswith("name contains whitespace")
    assert reasons[f"{session}/new\nline.wav"].startswith("name contains whitespace")
    assert reasons[f"{session}/notes.txt"].startswith("not an audio file this reads (.wav, .flac")
    assert reasons[f"{session}/nan.wav"] == "audio contains NaN or inf samples"
    assert reasons[f"{session}/loop.wav"] == "broken link or link loop"
    assert reasons[f"{session}/dangling.wav"] == "broken link or link loop"
    assert reasons[os.fsdecode(not_utf8)] == "name is not valid UTF-8"
    assert reasons[str(trial_file)] == "line 1 dropped: spk01/sess0/short.wav was skipped"
    rows = read_manifest(out)
    ids = {r["id"] for r in rows}
    assert {"spk02/sess0/u9.ogg", "spk02/sess0/u8.mp3"} <= ids
    assert not any(bad in i for i in ids for bad in ("corrupt", "empty", "short", "words", "nan", "loop", "dangling"))
    ogg = next(r for r in rows if r["id"].endswith(".ogg"))
    # tolerance: Ogg Vorbis frames pad a 1 s file by up to a few ms
    assert float(ogg["duration"]) == pytest.approx(1.0, abs=0.01)
    assert len(read_trials(out / "trials" / "t.txt")) == 1


def test_unreadable_folder_is_skipped_with_a_reason(corpus, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads a chmod 000 folder: the in-process variant below covers it")
    corpus, out = own_copy(corpus, tmp_path), tmp_path / "out"
    locked = corpus / "spk05" / "sess1"
    locked.chmod(0)
    try:
        prepare("--corpus", corpus, "--out", out)
    finally:
        locked.chmod(0o755)
    assert read_skipped(out) == {str(locked): "unreadable folder (Permission denied)"}
    assert len(read_manifest(out)) == 69


def test_unreadable_folder_is_skipped_even_as_root(corpus, tmp_path, monkeypatch):
    locked, real_scandir = corpus / "spk05" / "sess1", os.scandir

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    prepare("--corpus", corpus, "--out", tmp_path / "out")
    assert read_skipped(tmp_path / "out") == {str(locked): "unreadable folder (Permission denied)"}
    assert len(read_manifest(tmp_path / "out")) == 69


@pytest.mark.parametrize("line, problem", [
    ("1 spk00/sess0/u0.wav spk00/sess0/missing.wav", ":2: spk00/sess0/missing.wav not found in the corpus"),
    ("1 spk00/sess0/u0.wav", ":2: expected 'label enroll test' with label 1/0 or target/nontarget, got "
                             "'1 spk00/sess0/u0.wav'"),
    ("yes spk00/sess0/u0.wav spk00/sess0/u1.flac", ":2: expected 'label enroll test'"),
    ("0 spk00/sess0/u0.wav ../elsewhere/sess0/u0.wav", ":2: ../elsewhere/sess0/u0.wav is outside the corpus root"),
    ("0 spk00/sess0/u0.wav /etc/passwd", ":2: /etc/passwd is outside the corpus root"),
])
def test_bad_trial_lines_are_clear_errors(corpus, tmp_path, line, problem):
    trial_file = tmp_path / "trials.txt"
    trial_file.write_text("1 spk00/sess0/u0.wav spk00/sess1/u0.wav\n" + line + "\n")
    with pytest.raises(SystemExit) as error:
        prepare("--corpus", corpus, "--out", tmp_path / "out", "--trials", trial_file)
    assert str(error.value).startswith(f"{trial_file}{problem}") and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- --demo
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One --demo run (about 10 s)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    result = cli("--demo", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "prepared 480 utterances of 40 speakers (train 336 / valid 48 / test 96)" in result.stdout
    return out


def test_demo_is_deterministic_and_relative(demo, tmp_path):
    # the audio lives inside the data folder: paths relative to it, so the folder can move
    rows = read_manifest(demo)
    assert (rows[0]["id"], rows[0]["path"]) == ("spk00/sess0/utt0.wav", "corpus/spk00/sess0/utt0.wav")
    for speaker in (0, 39):  # each speaker has its own seeded generator: the same files again
        make_demo_speaker(tmp_path, 0, speaker)
        for name in (f"spk{speaker:02d}/sess0/utt0.wav", f"spk{speaker:02d}/sess2/utt3.wav"):
            assert (demo / "corpus" / name).read_bytes() == (tmp_path / name).read_bytes()
    info = sf.info(demo / "corpus" / "spk00" / "sess0" / "utt0.wav")
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    assert 2.0 <= info.duration <= 4.0
    check_trial_list(demo / "trials" / "test.txt", rows)
    valid = check_trial_list(demo / "trials" / "valid.txt", rows, balanced=False)
    assert len(valid) == 48 * 47 // 2  # 4 valid speakers x 12 utterances, every pair
    assert sorted(p.name for p in demo.parent.iterdir()) == ["out"]  # no build folder left beside it


def log_spectrum(path):
    """Mean log power spectrum of an utterance (512-point frames), level removed."""
    audio, _ = sf.read(path)
    frames = audio[: len(audio) // 512 * 512].reshape(-1, 512) * np.hanning(512)
    spectrum = np.log(np.mean(np.abs(np.fft.rfft(frames)) ** 2, axis=0) + 1e-10)
    return spectrum - spectrum.mean()  # the demo draws a random level per utterance


def test_a_full_disk_during_demo_is_one_line_and_the_old_demo_stays(demo, tmp_path):
    """soundfile asserts on a short write (a bare AssertionError): --demo must say what a full disk says elsewhere."""
    import resource
    import signal
    out = tmp_path / "out"
    shutil.copytree(demo, out)
    before = snapshot(out)

    def small_files():  # writes past 20 kB fail with EFBIG, as on a full disk; a demo file is ~40-130 kB
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    result = subprocess.run([sys.executable, "prepare_voxceleb.py", "--demo", "--out", str(out), "--seed", "1",
                             "--overwrite"], cwd=REPO, capture_output=True, text=True, timeout=300,
                            preexec_fn=small_files)
    one_line_error(result, f"cannot write the preparation of {out}", "File too large", f"{out} is left as it was")
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_demo_speakers_really_differ(demo):
    corpus = demo / "corpus"
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
def test_real_mini(real_mini, tmp_path):
    out = tmp_path / "out"
    prepare("--corpus", real_mini, "--out", out)
    rows = read_manifest(out)
    assert len({r["speaker"] for r in rows}) == 19
    assert {r["sample_rate"] for r in rows} == {"8000", "16000"}
    assert {Path(r["path"]).suffix for r in rows} == {".wav", ".flac"}
    assert min(float(r["duration"]) for r in rows) >= 0.3
    skipped = read_skipped(out)
    fsdd = {"george", "jackson", "lucas", "nicolas", "theo", "yweweler"}
    assert len(skipped) == 48 and len(rows) + len(skipped) == 412  # short FSDD digits, nothing else
    for path, reason in skipped.items():
        assert Path(path).relative_to(real_mini.resolve()).parts[0] in fsdd
        assert reason.startswith("too short (") and sf.info(path).duration < 0.3
    check_trial_list(out / "trials" / "test.txt", rows)
    check_trial_list(out / "trials" / "valid.txt", rows, balanced=False)


# ---------------------------------------------------------------- units
def test_trial_list_names():
    assert prep.trial_list_name("a/veri_test.txt") == "vox1-O"
    assert prep.trial_list_name("veri_test2.txt") == "vox1-O-clean"
    assert prep.trial_list_name("list_test_all.txt.gz") == "vox1-E"
    assert prep.trial_list_name("list_test_hard2.txt") == "vox1-H-clean"
    assert prep.trial_list_name("/x/my-list.txt.gz") == "my-list"


def test_corpus_id_stays_inside_root(tmp_path):
    roots = [tmp_path / "wav"]
    assert prep.corpus_id("a/b/c.wav", roots) == "a/b/c.wav"
    assert prep.corpus_id("./a/../a/b/c.wav", roots) == "a/b/c.wav"
    assert prep.corpus_id(str(tmp_path / "wav" / "a" / "b" / "c.wav"), roots) == "a/b/c.wav"
    assert prep.corpus_id("../wav2/b/c.wav", roots) is None
    assert prep.corpus_id(str(tmp_path / "wav2" / "b" / "c.wav"), roots) is None


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


def test_all_pair_trials_unit():
    by_speaker = {s: [f"{s}/v/{u}.wav" for u in range(n)] for s, n in (("a", 5), ("b", 3), ("c", 1))}
    trials = prep.all_pair_trials(by_speaker, 6, random.Random(0))
    chosen = sorted({u for t in trials for u in t[1:]})
    assert Counter(u[0] for u in chosen) == {"a": 3, "b": 2, "c": 1}  # round-robin over the speakers
    assert [t[1:] for t in trials] == list(combinations(chosen, 2))
    assert all(t[0] == (t[1][0] == t[2][0]) for t in trials)
    assert len(prep.all_pair_trials(by_speaker, 100, random.Random(0))) == 9 * 8 // 2  # fewer than asked: all


def test_what_is_not_speaker_session_utterance_is_listed_and_hidden_entries_ignored(corpus, tmp_path):
    mine = tmp_path / "corpus"
    shutil.copytree(corpus, mine)
    (mine / "README.txt").write_text("about this corpus")  # a file at the corpus root
    nested = mine / "spk00" / "sess0" / "extra"
    nested.mkdir()
    shutil.copy(next(mine.glob("spk00/sess0/*.wav")), nested / "deep.wav")  # a folder below the session
    (mine / ".git" / "objects").mkdir(parents=True)  # hidden: not a speaker
    (mine / "spk00" / ".DS_Store").write_text("")
    out = tmp_path / "out"
    prepare("--corpus", mine, "--out", out)
    reasons = dict(line.split("\t") for line in (out / "skipped.txt").read_text().splitlines())
    assert reasons[str(mine / "README.txt")] == "not inside a speaker/session/ folder"
    assert reasons[str(nested)].startswith("a folder below speaker/session/")
    assert not any(".git" in p or ".DS_Store" in p for p in reasons)
    assert ".git" not in (out / "speakers.txt").read_text()


# ---------------------------------------------------------------- the effects pass
def test_effects_are_computed_once_per_data_folder(corpus, tmp_path, capsys, monkeypatch):
    """effects.tsv covers exactly the training files, with the lengths SUPERB's chain leaves; a re-run of the
    same command after an interrupted pass completes it; --effects none skips it."""
    from asv import data as data_module
    from asv.audio import load_audio, superb_effects
    from asv.data import EFFECTS_FILE, read_manifest as manifest, stored_path, trim_once
    out = tmp_path / "out"
    printed = prepare("--corpus", corpus, "--out", out, "--workers", "2", capsys=capsys)
    train = [u for u in manifest(out) if u.split == "train"]
    assert f"effects.tsv: SUPERB's effects of {len(train)} training files" in printed
    rows = [line.split("\t") for line in (out / EFFECTS_FILE).read_text().splitlines()[3:]]
    assert [r[0] for r in rows] == sorted(stored_path(u.path, out) for u in train)  # as the manifest stores them
    kept = {r[0]: int(r[5]) for r in rows}
    assert all(kept[stored_path(u.path, out)] == superb_effects(load_audio(u.path, 16000), 16000).numel() for u in train)
    # interrupted: the table lost; the same command again computes it, a third time reads it
    table = (out / EFFECTS_FILE).read_text()
    (out / EFFECTS_FILE).unlink()
    assert "effects.tsv: SUPERB's effects" in prepare("--corpus", corpus, "--out", out, capsys=capsys)
    assert (out / EFFECTS_FILE).read_text() == table
    monkeypatch.setattr(data_module, "superb_intervals", lambda *a: pytest.fail("decoded again"))
    trim_once(out, train, 16000, workers=0, show_progress=False)
    prepare("--corpus", corpus, "--out", tmp_path / "none", "--effects", "none")
    assert not (tmp_path / "none" / EFFECTS_FILE).exists()


def test_auto_validation_counts_trials_not_speakers():
    """A corpus with 5 utterances per speaker needs more validation speakers than one with 50 for the same
    trial counts; a corpus too small for them gets the most it can give within a third of its speakers."""
    def auto(num_speakers, per_speaker, max_utts=300):
        order = [f"s{i:03d}" for i in range(num_speakers)]
        return prep.auto_valid_speakers(order, dict.fromkeys(order, per_speaker), max_utts, num_speakers // 3)

    rich, rich_line = auto(200, 50)
    assert len(rich) == prep.VALID_MIN_SPEAKERS  # 10 x C(30, 2) = 4350 targets already
    assert prep.valid_trial_counts([50] * 10, 300) == (4350, 40500) and "fewer than" not in rich_line
    poor, poor_line = auto(200, 5)
    assert len(poor) == 60  # 60 x 5 = the 300 utterances: 600 targets, the most any count gives
    assert prep.valid_trial_counts([5] * 60, 300) == (600, 44250)
    assert "validation: 60 speakers, 600 target and 44250 non-target trials (fewer than the 1000" in poor_line
    assert len(auto(400, 5, max_utts=1000)[0]) == 100  # more utterances allowed: 100 x C(5, 2) = 1000 targets
    # the corpus of issue 22 (83 speakers of 5 utterances, 8 tested): 25 speakers, not 4 (40 targets)
    small, line = auto(75, 5)
    assert len(small) == 25 and "validation: 25 speakers, 250 target and 7500 non-target trials" in line
    assert 75 - len(small) >= 2 * len(small)  # most speakers still train
