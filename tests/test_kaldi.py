"""Kaldi conventions: prepare_voxceleb.py --kaldi DIR (wav.scp + utt2spk -> our manifest, Kaldi's utterance ids),
evaluate_asv.py --extract on a Kaldi folder or a wav.scp, trial lists in Kaldi's `enroll test target` order, and a
one-line error for each malformed input."""
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import prepare_voxceleb as prep
from asv.config import load_config
from asv.run import save_config
from asv.data import read_audio_list, read_trials, read_utt2spk, read_wav_scp
from asv.embed import build_models, meta_of
from asv.models import save_model_file

ROOT = Path(__file__).resolve().parents[1]
SPEAKERS = [f"spk{s}" for s in range(6)]


def kaldi_folder(base: Path) -> Path:
    """base/audio/*.wav (6 speakers x 4 utterances of tone and noise) and the Kaldi data folder base/kaldi naming them,
    ids `<speaker>-utt<k>` as Kaldi recipes make them."""
    rng = np.random.default_rng(0)
    scp, utt2spk = [], []
    for s, spk in enumerate(SPEAKERS):
        for k in range(4):
            utt, path = f"{spk}-utt{k}", base / "audio" / f"{spk}_{k}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            t = np.arange(16000) / 16000
            sf.write(path, 0.3 * np.sin(2 * np.pi * (120 + 40 * s) * t) + 0.05 * rng.standard_normal(16000), 16000)
            scp.append(f"{utt} {path}\n")
            utt2spk.append(f"{utt} {spk}\n")
    (base / "kaldi").mkdir()
    (base / "kaldi" / "wav.scp").write_text("".join(reversed(scp)))  # any order
    (base / "kaldi" / "utt2spk").write_text("".join(utt2spk))
    return base / "kaldi"


@pytest.fixture
def kaldi(tmp_path):
    return kaldi_folder(tmp_path)


def one_line_exit(argv, message):
    with pytest.raises(SystemExit) as error:
        prep.main([str(a) for a in argv])
    text = str(error.value)
    assert message in text and "\n" not in text, text


def test_prepare_reads_a_kaldi_folder(kaldi, tmp_path):
    trials = tmp_path / "trials.txt"  # Kaldi's order and ours, naming Kaldi utterance ids
    trials.write_text("spk0-utt0 spk0-utt1 target\nspk0-utt0 spk1-utt2 nontarget\n1 spk1-utt0 spk1-utt3\n")
    out = tmp_path / "data"
    prep.main(["--kaldi", str(kaldi), "--out", str(out), "--trials", str(trials), "--valid-speakers", "2"])
    with open(out / "utterances.csv", newline="") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == sorted(f"{spk}-utt{k}" for spk in SPEAKERS for k in range(4))
    assert rows["spk3-utt2"]["speaker"] == "spk3"
    assert rows["spk3-utt2"]["path"] == str(tmp_path / "audio" / "spk3_2.wav")
    assert {rows[f"{spk}-utt0"]["split"] for spk in ("spk0", "spk1")} == {"test"}  # the trial list's speakers
    assert (out / "trials" / "trials.txt").read_text() == ("1 spk0-utt0 spk0-utt1\n0 spk0-utt0 spk1-utt2\n"
                                                          "1 spk1-utt0 spk1-utt3\n")
    valid = read_trials(out / "trials" / "valid.txt")
    assert valid.labels.sum() > 0 and all(u.split("-")[0] not in ("spk0", "spk1") for u in valid.enroll)
    assert json.loads((out / "prepare.json").read_text())["arguments"]["kaldi"] == str(kaldi)


def test_prepare_refuses_a_trial_naming_no_kaldi_utterance(kaldi, tmp_path):
    trials = tmp_path / "trials.txt"
    trials.write_text("spk0-utt0 spk0-utt9 target\n")
    one_line_exit(["--kaldi", kaldi, "--out", tmp_path / "data", "--trials", trials],
                  "spk0-utt9 not found in the corpus (not an utterance id of wav.scp)")


@pytest.mark.parametrize("file, text, message", [
    ("wav.scp", "spk0-utt0\n", "wav.scp:1: expected 'utt_id path'"),
    ("wav.scp", "spk0-utt0 /no/such.wav\n", "wav.scp:1: spk0-utt0: no such audio file /no/such.wav"),
    ("wav.scp", "spk0-utt0 sox a.wav -t wav - |\n", "wav.scp:1: spk0-utt0 is a command (sox a.wav -t wav - |)"),
    ("wav.scp", "{first}\n{first}\n", "wav.scp:2: utterance id spk0-utt0 appears twice (first on line 1)"),
    ("wav.scp", "\n", "wav.scp: empty wav.scp"),
    ("utt2spk", "spk0-utt0 spk0\nspk9-utt0 spk9\n", "utt2spk:2: spk9-utt0 is not an utterance of wav.scp"),
    ("utt2spk", "spk0-utt0 spk0\nspk0-utt0 spk1\n", "utt2spk:2: utterance id spk0-utt0 appears twice"),
    ("utt2spk", "spk0-utt0\n", "utt2spk:1: expected 'utt_id speaker'"),
    ("utt2spk", "spk0-utt0 spk0\n", "utt2spk: no speaker for 23 utterance(s) of wav.scp"),
    ("segments", "spk0-utt0-a spk0-utt0 0.0 0.5\n", "segments: utterances cut out of recordings are not read"),
])
def test_malformed_kaldi_folders_are_one_line(kaldi, tmp_path, file, text, message):
    first = (kaldi / "wav.scp").read_text().splitlines()[-1]  # spk0-utt0's line
    (kaldi / file).write_text(text.format(first=first))
    one_line_exit(["--kaldi", kaldi, "--out", tmp_path / "data"], message)
    if file != "utt2spk":  # --extract reads the same wav.scp the same way
        with pytest.raises(ValueError, match=re.escape(message)):
            read_audio_list(str(kaldi))


def test_missing_utt2spk(kaldi, tmp_path):
    (kaldi / "utt2spk").unlink()
    one_line_exit(["--kaldi", kaldi, "--out", tmp_path / "data"], "utt2spk: no such file")


def test_readers(kaldi):
    ids, paths = read_wav_scp(kaldi / "wav.scp")
    assert ids[0] == "spk5-utt3" and Path(paths[0]).name == "spk5_3.wav"  # in the file's order
    assert read_audio_list(str(kaldi)) == (ids, paths) == read_audio_list(str(kaldi / "wav.scp"))
    assert read_utt2spk(kaldi / "utt2spk", ids)["spk2-utt1"] == "spk2"


def test_extract_a_kaldi_folder(kaldi, tmp_path):
    """evaluate_asv.py --extract DIR: one embedding per wav.scp line, keyed by its utterance id."""
    cfg = load_config(str(ROOT / "configs" / "demo.yaml"), ["num_workers=0"])
    run = tmp_path / "run"
    (run / "step-0").mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    upstream, encoder = build_models(cfg)
    save_model_file(str(run / "step-0" / "model.pt"), encoder, upstream, False, meta_of(cfg, upstream))
    out = tmp_path / "emb.npz"
    result = subprocess.run([sys.executable, "evaluate_asv.py", "--ckpt_dir", run / "step-0", "--extract", kaldi,
                             "--out", out], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    saved = np.load(out)
    assert saved["ids"].tolist() == read_wav_scp(kaldi / "wav.scp")[0]
    assert saved["embeddings"].shape == (24, cfg.downstream.embed_dim)
