"""asv/audio.py and asv/data.py: audio reading, manifests and trial lists, training batches (SUPERB's whole
utterances cut to max_secs, or fixed crops), SUPERB's effects on training audio, and evaluation batches."""
import gzip
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import VOX1_META, need

from asv import data as data_module
from asv.audio import AUDIO_EXTENSIONS, AudioError, header_frames, load_audio
from asv.augment import Augmenter
from asv.config import AugmentConfig
from asv.data import (EFFECTS_FILE, EFFECTS_PARTS, SPEED_CLASS, TrainBatchSampler, TrainDataset, Trials, Utterance,
                      UtteranceDataset, collate_padded, example_samples, length_batches, read_effects, read_manifest,
                      read_trials, stored_path, trim_once)
from asv.audio import superb_effects, trimmed_span

SR = 16000


def write(path, data, sr=SR, subtype="FLOAT", **kw):
    sf.write(str(path), data, sr, subtype=subtype, **kw)
    return str(path)


def ramp(n):
    """Distinct, exactly representable float32 samples: a crop's first value tells its offset."""
    return (np.arange(n, dtype=np.float32) / 2**16).astype(np.float32)


def noise(n, seed=0, level=0.1):
    return np.random.default_rng(seed).uniform(-level, level, n).astype(np.float32)


# ---------------------------------------------------------------- load_audio

def test_native_rate_is_returned_unchanged(tmp_path):
    x = np.random.default_rng(0).uniform(-0.5, 0.5, SR).astype(np.float32)
    wav = load_audio(write(tmp_path / "a.wav", x), SR)
    assert wav.dtype == torch.float32 and wav.shape == (SR,)
    np.testing.assert_array_equal(wav.numpy(), x)


def test_8k_file_is_resampled_to_16k(tmp_path):
    t = np.arange(8000) / 8000
    x = (0.5 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    wav = load_audio(write(tmp_path / "a8k.wav", x, sr=8000), SR)
    assert wav.dtype == torch.float32 and wav.ndim == 1
    assert wav.numel() == 2 * 8000
    # the same 200 Hz tone, now at 16 kHz (edges aside)
    t16 = np.arange(16000) / 16000
    # tolerance: resampling's band-limited filter ripple on a 200 Hz tone (Kaiser window, ~-40 dB = 1e-2)
    np.testing.assert_allclose(wav.numpy()[200:-200], 0.5 * np.sin(2 * np.pi * 200 * t16)[200:-200], atol=1e-2)


def test_stereo_is_averaged_to_mono(tmp_path):
    rng = np.random.default_rng(1)
    left, right = rng.uniform(-0.5, 0.5, (2, 4000)).astype(np.float32)
    wav = load_audio(write(tmp_path / "st.wav", np.stack([left, right], axis=1)), SR)
    assert wav.shape == (4000,)
    # tolerance: the mean of two float32 channels: 1 ulp of samples in [-1, 1]
    np.testing.assert_allclose(wav.numpy(), (left + right) / 2, atol=1e-7)


def test_partial_read_returns_the_slice(tmp_path):
    x = ramp(SR)
    path = write(tmp_path / "r.wav", x)
    wav = load_audio(path, SR, start_secs=0.25, num_secs=0.5)
    np.testing.assert_array_equal(wav.numpy(), x[4000:12000])
    np.testing.assert_array_equal(load_audio(path, SR, start_secs=0.75).numpy(), x[12000:])
    np.testing.assert_array_equal(load_audio(path, SR, num_secs=0.1).numpy(), x[:1600])


def test_partial_read_of_a_resampled_file(tmp_path):
    path = write(tmp_path / "r8k.wav", np.zeros(8000, np.float32) + 0.1, sr=8000)
    assert load_audio(path, SR, start_secs=0.25, num_secs=0.5).numel() == 8000


def test_flac(tmp_path):
    x = np.random.default_rng(2).uniform(-0.5, 0.5, 3000)
    path = write(tmp_path / "a.flac", x, subtype="PCM_16")
    wav = load_audio(path, SR)
    assert wav.dtype == torch.float32 and wav.shape == (3000,)
    # tolerance: 16-bit PCM quantisation step
    np.testing.assert_allclose(wav.numpy(), x, atol=1 / 2**15)
    assert header_frames(path) == (3000, SR)


@pytest.mark.parametrize("ext, fmt, subtype, sr", [(".ogg", "OGG", "VORBIS", SR), (".opus", "OGG", "OPUS", 48000),
                                                   (".mp3", "MP3", "MPEG_LAYER_III", SR)])
def test_compressed_formats(tmp_path, ext, fmt, subtype, sr):
    assert ext in AUDIO_EXTENSIONS
    t = np.arange(sr) / sr
    path = write(tmp_path / f"tone{ext}", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr=sr,
                 subtype=subtype, format=fmt)
    frames, rate = header_frames(path)
    assert rate == sr and abs(frames - sr) < 0.1 * sr
    wav = load_audio(path, SR)
    assert wav.dtype == torch.float32 and abs(wav.numel() - SR) < 0.1 * SR and torch.isfinite(wav).all()
    spectrum = np.abs(np.fft.rfft(wav.numpy()))
    assert abs(np.argmax(spectrum) * SR / wav.numel() - 440) < 5  # the tone survives the codec


def test_audio_extensions():
    assert set(AUDIO_EXTENSIONS) >= {".wav", ".flac", ".m4a", ".ogg", ".opus", ".mp3"}


def assert_audio_error(path, *words):
    with pytest.raises(AudioError) as e:
        load_audio(str(path), SR)
    assert str(e.value).startswith(str(path))
    for w in words:
        assert w in str(e.value)
    assert isinstance(e.value, ValueError)


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(np.random.default_rng(3).bytes(4000))
    assert_audio_error(path, "unreadable")


def test_empty_file(tmp_path):
    path = write(tmp_path / "empty.wav", np.zeros(0, np.float32), subtype="PCM_16")
    assert sf.info(path).frames == 0
    assert_audio_error(path)


def test_nan_samples(tmp_path):
    x = np.full(1600, 0.1, np.float32)
    x[100] = np.nan
    assert_audio_error(write(tmp_path / "nan.wav", x), "NaN")


def test_inf_samples(tmp_path):
    x = np.full(1600, 0.1, np.float32)
    x[7] = np.inf
    assert_audio_error(write(tmp_path / "inf.wav", x))


def test_missing_file(tmp_path):
    assert_audio_error(tmp_path / "nowhere.wav", "no such file")


def test_channels_that_cancel_are_silent(tmp_path):
    x = noise(4000, seed=4)
    path = write(tmp_path / "phase.wav", np.stack([x, -x], axis=1))
    assert_audio_error(path, "silent", "2 channels")


def test_truncated_silent_and_44k_files(tmp_path):
    """Real-world damage: a half-copied file, a silent file, a 44.1 kHz stereo recording."""
    rng = np.random.default_rng(0)
    wav = tmp_path / "whole.wav"
    sf.write(wav, rng.normal(0, 0.1, 16000), 16000, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(wav.read_bytes()[: wav.stat().st_size // 2])
    assert 0 < load_audio(str(cut), 16000).numel() < 16000  # what survives of a cut WAV is read
    flac = tmp_path / "whole.flac"
    sf.write(flac, rng.normal(0, 0.1, 16000), 16000)
    cut_flac = tmp_path / "cut.flac"
    cut_flac.write_bytes(flac.read_bytes()[: flac.stat().st_size // 2])
    with pytest.raises(AudioError, match=f"^{cut_flac}: unreadable"):
        load_audio(str(cut_flac), 16000)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000), 16000, subtype="PCM_16")
    with pytest.raises(AudioError, match=f"^{silent}: silent"):
        load_audio(str(silent), 16000)
    assert load_audio(str(silent), 16000, 0.0, 0.5).numel() == 8000  # a silent training crop is fine
    cd = tmp_path / "cd.wav"
    sf.write(cd, rng.normal(0, 0.1, (44100, 2)), 44100, subtype="PCM_16")
    out = load_audio(str(cd), 16000)
    assert out.shape == (16000,) and out.dtype == torch.float32


# ---------------------------------------------------------------- manifests and trials

MANIFEST = """id,path,speaker,duration,sample_rate,split
id10001/a/00001,wav/id10001/a/00001.wav,id10001,8.12,16000,train
id10001/b/00002,wav/id10001/b/00002.wav,id10001,4.5,16000,valid
id10270/c/00003,/corpora/vox/id10270/c/00003.wav,id10270,12,16000,test
"""


def test_read_manifest_resolves_paths_against_the_data_folder(tmp_path, monkeypatch):
    (tmp_path / "utterances.csv").write_text(MANIFEST)
    monkeypatch.chdir("/")  # read from anywhere
    utts = read_manifest(str(tmp_path))
    base = str(tmp_path.resolve())
    assert utts == [
        Utterance("id10001/a/00001", f"{base}/wav/id10001/a/00001.wav", "id10001", 8.12, 16000, "train"),
        Utterance("id10001/b/00002", f"{base}/wav/id10001/b/00002.wav", "id10001", 4.5, 16000, "valid"),
        Utterance("id10270/c/00003", "/corpora/vox/id10270/c/00003.wav", "id10270", 12.0, 16000, "test"),
    ]
    assert isinstance(utts[2].duration, float) and isinstance(utts[0].sample_rate, int)


def test_a_moved_data_folder_reads_the_same_files(tmp_path):
    data = tmp_path / "data"
    audio = data / "wav" / "spk" / "a.wav"
    audio.parent.mkdir(parents=True)
    write(audio, noise(1600))
    row = f"spk/a,{stored_path(str(audio), data)},spk,0.1,16000,train\n"
    assert row.split(",")[1] == os.path.join("wav", "spk", "a.wav")  # inside: relative
    (data / "utterances.csv").write_text("id,path,speaker,duration,sample_rate,split\n" + row)
    moved = tmp_path / "moved"
    data.rename(moved)
    (utt,) = read_manifest(moved)
    assert utt.path == str(moved.resolve() / "wav" / "spk" / "a.wav") and os.path.isfile(utt.path)


def test_stored_path(tmp_path):
    data = tmp_path / "vox1"
    assert stored_path(str(data / "wav" / "x.wav"), data) == os.path.join("wav", "x.wav")
    outside = tmp_path / "vox1_other" / "x.wav"  # a sibling whose name starts the same is outside
    assert stored_path(str(outside), data) == str(outside)
    assert stored_path("/elsewhere/x.wav", data) == "/elsewhere/x.wav"


def test_missing_manifest_names_it(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        read_manifest(str(tmp_path / "vox"))
    assert str(tmp_path / "vox" / "utterances.csv") in str(e.value)


@pytest.mark.parametrize("text", [MANIFEST.replace("8.12", "long"), MANIFEST.replace("sample_rate", "rate")])
def test_malformed_manifest_names_it(tmp_path, text):
    (tmp_path / "utterances.csv").write_text(text)
    with pytest.raises(ValueError, match="utterances.csv"):
        read_manifest(str(tmp_path))


TRIALS = "1 a b\n0 a c\n\ntarget d e\nnontarget d f\n"


def check_trials(trials):
    assert isinstance(trials, Trials)
    assert trials.labels.dtype == np.int8
    assert trials.labels.tolist() == [1, 0, 1, 0]
    assert trials.enroll == ["a", "a", "d", "d"]
    assert trials.test == ["b", "c", "e", "f"]
    assert trials.lines == [1, 2, 4, 5]  # line numbers in the file (a blank line is skipped)


def test_read_trials(tmp_path):
    path = tmp_path / "trials.txt"
    path.write_text(TRIALS)
    check_trials(read_trials(str(path)))


def test_read_trials_gz_and_bom(tmp_path):
    with gzip.open(tmp_path / "trials.txt.gz", "wt", encoding="utf-8") as f:
        f.write(TRIALS)
    check_trials(read_trials(tmp_path / "trials.txt.gz"))
    (tmp_path / "bom.txt").write_text("\ufeff" + TRIALS, encoding="utf-8")
    check_trials(read_trials(tmp_path / "bom.txt"))


@pytest.mark.parametrize("bad", ["2 a.wav b.wav", "1 a.wav", "1 a.wav b.wav c.wav", "yes a.wav b.wav"])
def test_malformed_trial_line_names_file_and_line(tmp_path, bad):
    path = tmp_path / "trials.txt"
    path.write_text(f"1 a.wav b.wav\n0 a.wav c.wav\n{bad}\n")
    with pytest.raises(ValueError, match=f"{path}:3"):
        read_trials(str(path))


def test_empty_missing_and_unreadable_trial_lists(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty.txt"):
        read_trials(str(path))
    with pytest.raises(ValueError, match="nowhere.txt: trial list not found"):
        read_trials(tmp_path / "nowhere.txt")
    (tmp_path / "binary.txt").write_bytes(b"1 a b\n\xff\xfe\x00 c d\n")
    with pytest.raises(ValueError, match="binary.txt: unreadable"):
        read_trials(tmp_path / "binary.txt")
    (tmp_path / "fake.txt.gz").write_text(TRIALS)  # not gzip inside
    with pytest.raises(ValueError, match="fake.txt.gz: unreadable"):
        read_trials(tmp_path / "fake.txt.gz")


# ---------------------------------------------------------------- TrainBatchSampler

def durations(n=400, seed=0):
    return np.random.default_rng(seed).uniform(1.0, 20.0, n)


def take(iterable, n):
    out = []
    for b in iterable:
        out.append(b)
        if len(out) == n:
            break
    return out


def sampler(d, batch_size=8, crop="fixed", min_secs=2.0, max_secs=8.0, seed=0, multiple=1):
    return TrainBatchSampler(d, batch_size, crop, min_secs, max_secs, seed, multiple)


@pytest.mark.parametrize("crop", ["fixed", "superb"])
def test_batches_per_epoch_is_a_multiple(crop):
    s = sampler(durations(103), 4, crop, 2, 3, multiple=3)
    assert len(s) == 24  # 25 full batches, rounded down to a multiple of 3
    batches = list(s.epoch_batches(0))
    assert len(batches) == len(s)
    assert all(len(b) == 4 for b in batches)
    for multiple in (1, 2, 5, 7):
        assert len(sampler(durations(103), 4, crop, 2, 3, multiple=multiple)) % multiple == 0


def test_too_few_utterances():
    with pytest.raises(ValueError):
        sampler(durations(7), batch_size=4, multiple=2)


@pytest.mark.parametrize("crop", ["fixed", "superb"])
def test_each_epoch_visits_each_utterance_at_most_once(crop):
    s = sampler(durations(103), 4, crop, multiple=3)
    for epoch in range(3):
        idx = [i for b in s.epoch_batches(epoch) for i, _, _ in b]
        assert len(idx) == len(set(idx)) == len(s) * 4
        assert all(0 <= i < 103 for i in idx)


@pytest.mark.parametrize("crop", ["fixed", "superb"])
def test_every_utterance_is_trained_on_over_epochs(crop):
    # the dropped remainder of an epoch is random, not the longest utterances of the last length bucket
    s = sampler(np.arange(1.0, 11.0), batch_size=3, crop=crop)  # 10 utterances, batches of 3: one left out
    seen = {i for epoch in range(30) for b in s.epoch_batches(epoch) for i, _, _ in b}
    assert seen == set(range(10))


def test_long_utterances_are_not_under_sampled():
    d = durations(1500, seed=5)
    s = sampler(d, batch_size=10, min_secs=2, max_secs=3, multiple=7)  # 147 batches: 30 left out
    visits = np.zeros(len(d))
    for epoch in range(40):
        np.add.at(visits, [i for b in s.epoch_batches(epoch) for i, _, _ in b], 1)
    order = np.argsort(d)
    # each utterance is kept with probability 1470/1500 per epoch, whatever its length
    assert abs(visits[order[-100:]].mean() - visits[order[:100]].mean()) < 2.0


@pytest.mark.parametrize("crop", ["fixed", "superb"])
def test_same_seed_same_batches(crop):
    a = sampler(durations(), crop=crop, seed=7, multiple=2)
    b = sampler(durations(), crop=crop, seed=7, multiple=2)
    n = 3 * len(a)
    assert take(a, n) == take(b, n)


def test_different_seed_different_order():
    a, b = sampler(durations(), seed=7), sampler(durations(), seed=8)
    first_a, first_b = list(a.epoch_batches(0)), list(b.epoch_batches(0))
    assert [[i for i, _, _ in x] for x in first_a] != [[i for i, _, _ in x] for x in first_b]
    assert [x[0][1] for x in first_a] != [x[0][1] for x in first_b]


def test_fixed_crop_secs_within_bounds_one_per_batch():
    s = sampler(durations())
    secs = []
    for b in take(s, 2 * len(s)):
        assert len({c for _, c, _ in b}) == 1  # one crop length per batch: no padding
        secs.append(b[0][1])
        assert all(isinstance(seed, int) for _, _, seed in b)
    assert all(2.0 <= c <= 8.0 for c in secs)
    assert max(secs) - min(secs) > 3.0  # drawn across the range, not a constant


def test_superb_crop_is_max_secs_for_every_utterance():
    s = sampler(durations(), crop="superb", min_secs=2.0, max_secs=8.0)
    assert {c for b in take(s, 2 * len(s)) for _, c, _ in b} == {8.0}


def test_endless_next_epoch_continues_in_another_order():
    s = sampler(durations())
    batches = take(s, 2 * len(s) + 1)
    assert len(batches) == 2 * len(s) + 1
    epoch0, epoch1 = batches[:len(s)], batches[len(s):2 * len(s)]
    assert epoch0 == list(s.epoch_batches(0))
    assert epoch1 == list(s.epoch_batches(1))
    assert [[i for i, _, _ in b] for b in epoch0] != [[i for i, _, _ in b] for b in epoch1]
    assert batches[-1] == next(iter(s.epoch_batches(2)))


def length_spread(d, s):
    return np.mean([np.ptp(d[[i for i, _, _ in b]]) for b in s.epoch_batches(0)])


def test_fixed_batches_group_similar_durations_superb_batches_do_not():
    d = durations(800, seed=3)
    random_spread = np.mean([np.ptp(d[b]) for b in np.random.default_rng(0).permutation(800).reshape(-1, 8)])
    assert length_spread(d, sampler(d)) < 0.1 * random_spread
    assert length_spread(d, sampler(d, crop="superb")) > 0.8 * random_spread  # plain random batches, as s3prl's


# ---------------------------------------------------------------- the length of a training example

def test_example_samples():
    assert example_samples(200_000, 8.0, SR, "superb") == 128_000  # longer: cut to max_secs
    assert example_samples(50_000, 8.0, SR, "superb") == 50_000  # shorter: whole, never tiled
    assert example_samples(128_000, 8.0, SR, "superb") == 128_000
    assert example_samples(50_000, 2.5, SR, "fixed") == 40_000  # fixed: the batch's crop, whatever the file
    assert example_samples(10_000, 2.5, SR, "fixed") == 40_000


def vox1_dev_durations():
    path = need(VOX1_META / "vox1_dev_duration.txt.gz")
    with gzip.open(path, "rt") as f:
        return np.array([float(line.split()[1]) for line in f if line.strip()])


def example_lengths(d, crop, min_secs, max_secs, epochs=1):
    """Seconds of every training example the sampler + the dataset's length rule give over `epochs` epochs."""
    s = TrainBatchSampler(d, 10, crop, min_secs, max_secs, seed=0, multiple=5)
    out = [example_samples(int(round(d[i] * SR)), secs, SR, crop) / SR
           for epoch in range(epochs) for b in s.epoch_batches(epoch) for i, secs, _ in b]
    return np.array(out)


def test_superb_crop_lengths_on_voxceleb1_dev():
    """s3prl's SUPERB recipe keeps utterances longer than 2 s and crops them to at most 8 s: an example lasts
    min(d, 8). Over the real VoxCeleb1 dev durations our sampler and length rule give that distribution."""
    d = vox1_dev_durations()
    assert len(d) == 148_642
    kept = d[d > 2.0]  # train_asv.py drops the others, as s3prl does
    target = np.minimum(kept, 8.0)
    got = example_lengths(kept, "superb", 2.0, 8.0)
    assert len(got) >= len(kept) - 50  # one epoch: all but the remainder of the last optimizer step
    assert got.max() == 8.0 and got.min() > 2.0
    # tolerance: sampling error of a mean over ~1000 random crops (std ~2 s / sqrt(1000) = 0.06 s, 1% of 6.4 s)
    assert got.mean() == pytest.approx(target.mean(), rel=0.01)
    # tolerance: sampling error of quantiles over ~1000 random crops (~0.05 s)
    np.testing.assert_allclose(np.quantile(got, [0.1, 0.5, 0.9]), np.quantile(target, [0.1, 0.5, 0.9]), atol=0.05)
    # the old fixed crops (one length per batch, uniform in [2, 8]) train on shorter examples
    fixed = example_lengths(kept, "fixed", 2.0, 8.0)
    assert fixed.mean() < got.mean() - 1.0
    # tolerance: sampling error of a mean of uniform 2-8 s crops over ~1000 examples (std 1.7 / sqrt(1000) = 0.05)
    assert fixed.mean() == pytest.approx(5.0, abs=0.1)


@pytest.fixture
def fake_audio(monkeypatch):
    """load_audio -> a ramp of the manifest's duration, so the dataset's cropping runs without files."""
    lengths = {}

    def load(path, sample_rate, start_secs=0.0, num_secs=None):
        n = lengths[path]
        start = int(round(start_secs * sample_rate))
        stop = n if num_secs is None else min(n, start + int(round(num_secs * sample_rate)))
        return torch.arange(start, stop, dtype=torch.float32)

    monkeypatch.setattr(data_module, "load_audio", load)
    # whole utterances at the model's rate are read as spans: the header's length, then [start, stop)
    monkeypatch.setattr(data_module, "header_frames", lambda path: (lengths[path], SR))
    monkeypatch.setattr(data_module, "trimmed_span",
                        lambda path, sr, intervals, db, start, stop: torch.arange(start, stop, dtype=torch.float32))
    return lengths


def test_the_dataset_follows_the_length_rule(fake_audio):
    d = np.random.default_rng(1).uniform(2.0, 12.0, 60)
    utts = [Utterance(f"u{i}", f"/fake/u{i}.wav", f"s{i % 7}", float(x), SR, "train") for i, x in enumerate(d)]
    fake_audio.update({u.path: int(round(u.duration * SR)) for u in utts})
    for crop in ("superb", "fixed"):
        ds = TrainDataset(utts, [i % 7 for i in range(60)], SR, crop, "none")
        for batch in TrainBatchSampler(d, 10, crop, 2.0, 8.0, seed=3, multiple=1).epoch_batches(0):
            for index, secs, seed in batch:
                wav, label = ds[(index, secs, seed)]
                assert wav.numel() == example_samples(fake_audio[utts[index].path], secs, SR, crop)
                assert label == index % 7
                if crop == "superb":  # a contiguous stretch of the utterance
                    assert torch.equal(wav, torch.arange(wav[0], wav[0] + wav.numel()))


# ---------------------------------------------------------------- TrainDataset

@pytest.fixture
def files(tmp_path):
    long = write(tmp_path / "long.wav", ramp(SR))  # 1 s
    short = write(tmp_path / "short.wav", ramp(4000) + 0.5)  # 0.25 s
    low = write(tmp_path / "low.wav", np.full(8000, 0.2, np.float32), sr=8000)  # 1 s at 8 kHz
    return [Utterance("long", long, "spk0", 1.0, SR, "train"),
            Utterance("short", short, "spk1", 0.25, SR, "train"),
            Utterance("low", low, "spk1", 1.0, 8000, "train")]


@pytest.fixture
def fixed_data(files):
    return TrainDataset(files, [0, 1, 1], SR, "fixed", "none")


@pytest.fixture
def superb_data(files):
    return TrainDataset(files, [0, 1, 1], SR, "superb", "none")


@pytest.mark.parametrize("secs", [0.5, 0.3333, 0.61, 1.0])
def test_fixed_crop_has_exactly_the_requested_samples(fixed_data, secs):
    for index in range(3):
        wav, label = fixed_data[(index, secs, 123)]
        assert wav.shape == (round(secs * SR),)
        assert wav.dtype == torch.float32
        assert label == [0, 1, 1][index]


@pytest.mark.parametrize("kind", ["fixed", "superb"])
def test_crop_is_a_contiguous_slice_of_the_file(fixed_data, superb_data, kind):
    ds = fixed_data if kind == "fixed" else superb_data
    x = ramp(SR)
    starts = set()
    for seed in range(8):
        wav, _ = ds[(0, 0.5, seed)]
        assert wav.numel() == 8000
        start = int(round(float(wav[0]) * 2**16))
        np.testing.assert_array_equal(wav.numpy(), x[start:start + 8000])
        starts.add(start)
    assert len(starts) >= 6  # a random offset per seed


def test_fixed_short_utterance_is_repeated_to_the_crop(fixed_data):
    wav, label = fixed_data[(1, 0.6, 5)]
    assert wav.shape == (9600,) and label == 1
    x = ramp(4000) + 0.5
    np.testing.assert_array_equal(wav[:4000].numpy(), x)
    np.testing.assert_array_equal(wav[4000:8000].numpy(), x)
    np.testing.assert_array_equal(wav[8000:].numpy(), x[:1600])


def test_superb_short_utterance_comes_back_whole(superb_data):
    wav, label = superb_data[(1, 8.0, 5)]
    np.testing.assert_array_equal(wav.numpy(), ramp(4000) + 0.5)  # whole, not tiled
    wav, _ = superb_data[(0, 8.0, 5)]
    np.testing.assert_array_equal(wav.numpy(), ramp(SR))
    wav, _ = superb_data[(2, 8.0, 5)]
    assert wav.numel() == SR  # the 8 kHz file, resampled, whole


def test_superb_crop_is_exactly_max_secs(superb_data):
    for seed in range(5):
        assert superb_data[(0, 0.75, seed)][0].numel() == 12000
    assert superb_data[(1, 0.75, 0)][0].numel() == 4000  # shorter than the crop: as it is


def test_same_seed_same_crop(fixed_data):
    a, _ = fixed_data[(0, 0.3, 42)]
    b, _ = fixed_data[(0, 0.3, 42)]
    assert torch.equal(a, b)


def test_superb_batches_are_padded_with_their_lengths(superb_data):
    wavs, lengths, labels = collate_padded([superb_data[(i, 0.5, i)] for i in (1, 0, 2)])
    assert wavs.shape == (3, 8000)
    assert lengths.tolist() == [4000, 8000, 8000]
    assert labels.tolist() == [1, 0, 1] and labels.dtype == torch.long
    np.testing.assert_array_equal(wavs[0, :4000].numpy(), ramp(4000) + 0.5)
    assert torch.all(wavs[0, 4000:] == 0)


def test_fixed_batches_need_no_padding(fixed_data):
    wavs, lengths, labels = collate_padded([fixed_data[(i, 0.5, i)] for i in range(3)])
    assert wavs.shape == (3, 8000)
    assert lengths.tolist() == [8000] * 3
    assert labels.tolist() == [0, 1, 1]


def test_speed_perturbed_examples_are_new_speakers(files):
    aug = Augmenter(AugmentConfig(speed_prob=1.0), SR)
    ds = TrainDataset(files, [0, 1, 1], SR, "fixed", "none", aug)
    assert ds.num_speakers == 2
    seen = set()
    for seed in range(12):
        factor = aug.speed_factor(np.random.default_rng(seed))  # the dataset's first draw from the item seed
        wav, label = ds[(0, 0.5, seed)]
        assert wav.numel() == 8000  # still the batch's crop
        assert label == 0 + SPEED_CLASS[factor] * 2
        seen.add(factor)
    assert seen == {0.9, 1.1}


# ---------------------------------------------------------------- SUPERB's effects on training audio

def speech_pause_speech(tmp_path, pause_secs, name="pause.wav"):
    x = np.concatenate([noise(SR, 1), np.zeros(int(pause_secs * SR), np.float32), noise(SR, 2)])
    return write(tmp_path / name, x), len(x)


def test_superb_effects_cut_a_pause(tmp_path):
    """0.5 s of digital silence between two loud stretches: SoX's `silence` drops it all but the first 20 ms
    window minus one sample (the trailing RMS window still hears the loud stretch): 8000 - 319 samples."""
    path, n = speech_pause_speech(tmp_path, 0.5)
    utt = Utterance("p", path, "spk", n / SR, SR, "train")
    wav, label = TrainDataset([utt], [0], SR, "superb", "superb")[(0, 8.0, 0)]
    assert abs(wav.numel() - (n - (8000 - 319))) <= 5
    assert 0.47 * SR < n - wav.numel() <= 0.5 * SR  # about 0.5 s shorter
    torch.testing.assert_close(wav, superb_effects(load_audio(path, SR), SR))
    gain = 10 ** (-3 / 20)
    # tolerance: a float32 gain of -3 dB on samples in [-1, 1]: a few ulp
    np.testing.assert_allclose(wav[-100:].numpy(), noise(SR, 2)[-100:] * gain, atol=1e-6)  # -3 dB, the end kept


def test_superb_effects_keep_a_short_pause(tmp_path):
    path, n = speech_pause_speech(tmp_path, 0.1)  # 1600 samples < 1600 + 320 - 1: kept
    utt = Utterance("p", path, "spk", n / SR, SR, "train")
    wav, _ = TrainDataset([utt], [0], SR, "superb", "superb")[(0, 8.0, 0)]
    assert abs(wav.numel() - n) <= 5


def test_superb_effects_then_crop(tmp_path):
    path, n = speech_pause_speech(tmp_path, 0.5)
    utt = Utterance("p", path, "spk", n / SR, SR, "train")
    ds = TrainDataset([utt], [0], SR, "superb", "superb")
    trimmed = superb_effects(load_audio(path, SR), SR)
    for seed in range(3):
        wav, _ = ds[(0, 1.0, seed)]
        assert wav.numel() == SR  # cut after the effects, from the trimmed audio
        starts = np.flatnonzero(trimmed.numpy() == wav[0].item())  # noise: one match
        assert any(torch.equal(wav, trimmed[s:s + SR]) for s in starts)


def test_all_silence_after_the_effects_is_an_audio_error(tmp_path):
    path = write(tmp_path / "hum.wav", np.full(SR, 1e-5, np.float32))  # not zero, but below 0.1 %
    utt = Utterance("hum", path, "spk", 1.0, SR, "train")
    with pytest.raises(AudioError, match="hum.wav: nothing left"):
        TrainDataset([utt], [0], SR, "superb", "superb")[(0, 8.0, 0)]


def pause_utts(tmp_path, pauses=(0.5, 0.1, 0.3)):
    paths = [speech_pause_speech(tmp_path, p, f"u{i}.wav") for i, p in enumerate(pauses)]
    return [Utterance(f"spk/u {i}", p, "spk", n / SR, SR, "train") for i, (p, n) in enumerate(paths)]


def count_decodes(monkeypatch):
    """The files the effects pass decodes from now on."""
    seen = []
    real = data_module.superb_intervals
    monkeypatch.setattr(data_module, "superb_intervals", lambda wav, sr: seen.append(wav.numel()) or real(wav, sr))
    return seen


def test_trim_once_is_once_per_data_folder(tmp_path, monkeypatch):
    utts = pause_utts(tmp_path)
    trims = trim_once(tmp_path, utts, SR, workers=0, show_progress=False)
    want = [superb_effects(load_audio(u.path, SR), SR).numel() for u in utts]
    assert trims.kept.tolist() == want  # exact sample counts: the durations training sorts and filters by
    assert want[0] < len(load_audio(utts[0].path, SR)) - 0.45 * SR  # the long pause is cut
    assert len(load_audio(utts[1].path, SR)) - want[1] <= 5  # the short one kept (as test_superb_effects_keep_a_short_pause)
    lines = (tmp_path / EFFECTS_FILE).read_text().splitlines()
    assert lines[0].startswith("# effects=superb gain_db=-3 ") and "corpus fingerprint" in lines[1]
    assert [line.split("\t")[0] for line in lines[3:]] == sorted(stored_path(u.path, tmp_path) for u in utts)
    assert not (tmp_path / EFFECTS_PARTS).exists()
    # another run on the same data folder reads it: no file is decoded, the very same trims come back
    seen = count_decodes(monkeypatch)
    again = trim_once(tmp_path, utts, SR, workers=0, show_progress=False)
    assert seen == [] and again.kept.tolist() == want
    assert all(np.array_equal(again[i][1], trims[i][1]) for i in range(len(utts)))


def test_trim_once_redoes_a_changed_file_only(tmp_path, monkeypatch):
    utts = pause_utts(tmp_path)
    trim_once(tmp_path, utts, SR, workers=0, show_progress=False)
    write(utts[2].path, noise(SR // 2, 7))  # rewritten: another size (and mtime)
    seen = count_decodes(monkeypatch)
    trims = trim_once(tmp_path, utts, SR, workers=0, show_progress=False)
    assert seen == [SR // 2]  # only the changed file, and its new content
    assert trims.kept[2] == superb_effects(load_audio(utts[2].path, SR), SR).numel()
    assert read_effects(tmp_path, utts, SR)[1] == []  # the table on disk is current again


def test_trim_once_resumes_after_a_kill(tmp_path, monkeypatch):
    utts = pause_utts(tmp_path, (0.5, 0.1, 0.3, 0.2))
    monkeypatch.setattr(data_module, "EFFECTS_CHUNK", 1)
    real = data_module.superb_intervals

    def killed_at_third(wav, sr):
        if len(seen) == 2:
            raise KeyboardInterrupt  # a kill in the middle of the pass
        seen.append(wav.numel())
        return real(wav, sr)

    seen = []
    monkeypatch.setattr(data_module, "superb_intervals", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        trim_once(tmp_path, utts, SR, workers=0, show_progress=False)
    assert not (tmp_path / EFFECTS_FILE).exists() and len(list((tmp_path / EFFECTS_PARTS).iterdir())) == 2
    monkeypatch.setattr(data_module, "superb_intervals", real)
    seen = count_decodes(monkeypatch)
    trims = trim_once(tmp_path, utts, SR, workers=0, show_progress=False)
    assert len(seen) == 2  # the two files the killed pass had not finished
    assert trims.kept.tolist() == [superb_effects(load_audio(u.path, SR), SR).numel() for u in utts]
    assert not (tmp_path / EFFECTS_PARTS).exists()


def test_trim_once_names_an_unreadable_file_and_keeps_the_work_done(tmp_path, monkeypatch):
    utts = pause_utts(tmp_path)
    monkeypatch.setattr(data_module, "EFFECTS_CHUNK", 1)
    bad = tmp_path / "u9.wav"
    bad.write_bytes(b"not audio")
    utts.append(Utterance("spk/u9", str(bad), "spk", 1.0, SR, "train"))
    with pytest.raises(AudioError, match=r"u9.wav: unreadable audio") as e:
        trim_once(tmp_path, utts, SR, workers=0, show_progress=False)
    assert "\n" not in str(e.value)
    assert len(read_effects(tmp_path, utts, SR)[1]) == 1  # the three readable files are kept


def test_trimmed_spans_equal_the_whole_file_chain_on_every_real_file(real_mini, tmp_path):
    """Every real-mini file (16 kHz FLAC, 8 kHz WAV: resampled whole), random crops: the span decode with the
    effects table gives exactly the samples of the whole-file chain (decode, resample, gain, trim, crop)."""
    paths = sorted(str(p) for p in real_mini.rglob("*") if p.suffix in (".flac", ".wav"))
    assert len(paths) == 412
    utts = [Utterance(str(i), p, "spk", sf.info(p).duration, sf.info(p).samplerate, "train") for i, p in enumerate(paths)]
    trims = trim_once(tmp_path, utts, SR, workers=0, show_progress=False)
    span = TrainDataset(utts, [0] * len(utts), SR, "superb", "superb", trims=trims)
    whole = TrainDataset(utts, [0] * len(utts), SR, "superb", "superb")
    rng = np.random.default_rng(0)
    checked = 0
    for i, p in enumerate(paths):
        ref = superb_effects(load_audio(p, SR), SR).numpy()
        assert trims.kept[i] == len(ref)
        if len(ref) == 0:  # one FSDD digit is all below SoX's threshold
            with pytest.raises(AudioError, match="nothing left"):
                span[(i, 1.0, 0)]
            continue
        for _ in range(3):
            stop = int(rng.integers(1, len(ref) + 1))
            start = int(rng.integers(0, stop))
            assert np.array_equal(trimmed_span(p, SR, trims[i][1], trims[i][0], start, stop).numpy(), ref[start:stop])
        item = (i, float(rng.uniform(0.3, 8.0)), int(rng.integers(2**31)))
        assert np.array_equal(span[item][0].numpy(), whole[item][0].numpy())
        checked += 1
    assert checked == 411


def test_spans_of_fixed_crops_and_effects_none(tmp_path):
    """Fixed crops (tiled) with the effects, and whole utterances without them: span == whole file."""
    utts = pause_utts(tmp_path)
    stereo = write(tmp_path / "st.flac", np.stack([noise(3 * SR, 3), noise(3 * SR, 4)], 1), subtype="PCM_16")
    utts.append(Utterance("st", stereo, "spk", 3.0, SR, "train"))  # two channels: float path, mixed to mono
    trims = trim_once(tmp_path, utts, SR, workers=0, show_progress=False)
    for crop, effects, t in (("fixed", "superb", trims), ("superb", "none", None)):
        span = TrainDataset(utts, [0] * len(utts), SR, crop, effects, trims=t)
        for i in range(len(utts)):
            for secs in (0.7, 2.5, 6.0):
                assert np.array_equal(span[(i, secs, 11 + i)][0].numpy(), whole_file_crop(utts[i], crop, effects, secs,
                                                                                          11 + i)), (crop, effects, i)


def whole_file_crop(utt, crop, effects, secs, seed):
    """What TrainDataset made of an item before spans: the whole file, the effects, the crop (no augmenter)."""
    rng = np.random.default_rng(seed)
    wav = load_audio(utt.path, SR)
    if effects == "superb":
        wav = superb_effects(wav, SR)
    keep = example_samples(wav.numel(), secs, SR, "superb")
    if keep < wav.numel():
        start = int(rng.integers(0, wav.numel() - keep + 1))
        wav = wav[start:start + keep]
    if crop == "fixed":
        need = example_samples(wav.numel(), secs, SR, "fixed")
        wav = wav.repeat(int(np.ceil(need / wav.numel())))[:need]
    return wav.numpy()


# ---------------------------------------------------------------- evaluation batches

@pytest.mark.parametrize("budget", [20.0, 55.0, 300.0])
def test_length_batches(budget):
    d = list(np.random.default_rng(4).uniform(0.5, 30.0, 60)) + [45.0, 80.0]  # two longer than some budgets
    batches = length_batches(d, budget)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(d)))  # every utterance exactly once
    assert [d[i] for i in flat] == sorted(d, reverse=True)  # longest first
    for b in batches:
        longest = max(d[i] for i in b)
        assert d[b[0]] == longest
        assert len(b) * longest <= budget or len(b) == 1
    for b, nxt in zip(batches, batches[1:]):  # full: the next utterance would not have fit
        assert (len(b) + 1) * d[b[0]] > budget
    alone = [b for b in batches if d[b[0]] > budget]
    assert all(len(b) == 1 for b in alone)


def test_length_batches_edge_cases():
    assert length_batches([], 10.0) == []
    assert length_batches([3.0], 1.0) == [[0]]
    assert length_batches([2.0, 2.0, 2.0], 6.0) == [[0, 1, 2]]


def test_eval_batch_secs_default_is_the_devices_own_and_a_set_value_wins():
    from asv.config import ConfigError, load_config
    from asv.embed import CPU_EVAL_BATCH_SECS, GPU_EVAL_BATCH_SECS, eval_batch_secs
    cfg = load_config(None, [])
    assert cfg.data.eval_batch_secs == 0  # no flag: resolved where evaluation runs
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):  # an SSL upstream on a CPU: one utterance per batch on any thread count
            torch.set_num_threads(n)
            assert length_batches([0.3, 5.0, 2.0], eval_batch_secs(cfg, "cpu")) == [[1], [2], [0]]
            # log-mel features stay batched
            assert eval_batch_secs(load_config(None, ["upstream.name=fbank"]), "cpu") == CPU_EVAL_BATCH_SECS == 60.0
    finally:
        torch.set_num_threads(threads)
    assert eval_batch_secs(cfg, torch.device("cuda", 1)) == GPU_EVAL_BATCH_SECS == 600.0
    assert eval_batch_secs(load_config(None, ["data.eval_batch_secs=5"]), "cuda") == 5.0
    with pytest.raises(ConfigError, match="data.eval_batch_secs"):
        load_config(None, ["data.eval_batch_secs=-1"])


def test_utterance_dataset_repeats_short_files(tmp_path):
    short = write(tmp_path / "short.wav", ramp(1000))
    long = write(tmp_path / "long.wav", ramp(5000))
    ds = UtteranceDataset([short, long], SR, min_samples=2500)
    assert len(ds) == 2
    wav, index = ds[0]
    assert index == 0 and wav.shape == (2500,)
    np.testing.assert_array_equal(wav.numpy(), np.tile(ramp(1000), 3)[:2500])
    wav, index = ds[1]
    assert index == 1
    np.testing.assert_array_equal(wav.numpy(), ramp(5000))
    assert UtteranceDataset([short], SR)[0][0].shape == (1000,)


def test_collate_padded():
    items = [(torch.ones(3), 7), (torch.full((5,), 2.0), 2), (torch.full((1,), 3.0), 4)]
    wavs, lengths, index = collate_padded(items)
    assert wavs.shape == (3, 5)
    assert lengths.tolist() == [3, 5, 1] and lengths.dtype == torch.long
    assert index.tolist() == [7, 2, 4]
    expected = torch.tensor([[1, 1, 1, 0, 0], [2, 2, 2, 2, 2], [3, 0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(wavs, expected)


# ---------------------------------------------------------------- loader workers

def cpus(monkeypatch, n: int, processes: int | None = None):
    """This process may use n CPUs (as taskset or a cgroup cpuset would say), with `processes` on the node."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
    if processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))


def test_num_workers_minus_one_is_the_cpus_this_process_may_use_less_one(monkeypatch):
    from asv.data import AUTO_WORKERS_CAP, loader_workers
    cpus(monkeypatch, 2)
    assert loader_workers(-1) == 1  # the main process keeps a core
    cpus(monkeypatch, 2, processes=2)
    assert loader_workers(-1) == 0  # one core per process: it loads its own batches
    cpus(monkeypatch, 1)
    assert loader_workers(-1) == 0
    cpus(monkeypatch, 64, processes=8)
    assert loader_workers(-1) == 7
    cpus(monkeypatch, 128)
    assert loader_workers(-1) == AUTO_WORKERS_CAP == 8
    assert loader_workers(3) == 3 and loader_workers(0) == 0  # a count is taken as given


@pytest.mark.parametrize("config", ["base.yaml", "xvector_bn.yaml", "cam_plus.yaml", "resnet34.yaml"])
def test_a_shipped_config_on_two_cores_starts_one_loader_worker(monkeypatch, config):
    """base.yaml said 4 (and others 16) whatever the machine: on 2 cores that is 5 (17) processes on 2 CPUs."""
    from asv.config import load_config
    from asv.data import train_loader
    from asv.embed import eval_loader
    from conftest import REPO
    cpus(monkeypatch, 2)
    # augmentation off: its noise folders are not here, and it has nothing to do with the loader's workers
    cfg = load_config(str(REPO / "configs" / config), ["augment.noise_prob=0", "augment.rir_prob=0",
                                                       "augment.speed_prob=0"])
    n = cfg.data.batch_size
    utts = [Utterance(f"u{i}", f"/nowhere/{i}.wav", "s", 3.0, 16000, "train") for i in range(n)]
    assert train_loader(cfg, utts, [0] * n, [3.0] * n).num_workers == 1
    assert eval_loader([u.path for u in utts], [3.0] * n, cfg, 400, "cpu").num_workers == 1


def test_num_workers_below_minus_one_is_refused():
    from asv.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="num_workers.*-1"):
        load_config(None, ["num_workers=-2"])
