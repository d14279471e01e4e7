"""Checks of data.py: audio loading, manifests and trial lists, training crops and evaluation batches."""
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import (AudioError, CropBatchSampler, CropDataset, Utterance, UtteranceDataset,  # noqa: E402
                  collate_crops, collate_padded, length_batches, load_audio, read_manifest, read_trials)

SR = 16000


def write(path, data, sr=SR, subtype="FLOAT"):
    sf.write(str(path), data, sr, subtype=subtype)
    return str(path)


def ramp(n):
    """Distinct, exactly representable float32 samples: a crop's first value tells its offset."""
    return (np.arange(n, dtype=np.float32) / 2**16).astype(np.float32)


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
    np.testing.assert_allclose(wav.numpy()[200:-200], 0.5 * np.sin(2 * np.pi * 200 * t16)[200:-200], atol=1e-2)


def test_stereo_is_averaged_to_mono(tmp_path):
    rng = np.random.default_rng(1)
    left, right = rng.uniform(-0.5, 0.5, (2, 4000)).astype(np.float32)
    wav = load_audio(write(tmp_path / "st.wav", np.stack([left, right], axis=1)), SR)
    assert wav.shape == (4000,)
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
    wav = load_audio(write(tmp_path / "a.flac", x, subtype="PCM_16"), SR)
    assert wav.dtype == torch.float32 and wav.shape == (3000,)
    np.testing.assert_allclose(wav.numpy(), x, atol=1 / 2**15)


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
    assert_audio_error(tmp_path / "nowhere.wav")


# ---------------------------------------------------------------- manifests and trials

MANIFEST = """id,path,speaker,duration,sample_rate,split
id10001/a/00001,wav/id10001/a/00001.wav,id10001,8.12,16000,train
id10001/b/00002,wav/id10001/b/00002.wav,id10001,4.5,16000,valid
id10270/c/00003,wav/id10270/c/00003.wav,id10270,12,16000,test
"""


def test_read_manifest(tmp_path):
    (tmp_path / "utterances.csv").write_text(MANIFEST)
    utts = read_manifest(str(tmp_path))
    assert utts == [
        Utterance("id10001/a/00001", "wav/id10001/a/00001.wav", "id10001", 8.12, 16000, "train"),
        Utterance("id10001/b/00002", "wav/id10001/b/00002.wav", "id10001", 4.5, 16000, "valid"),
        Utterance("id10270/c/00003", "wav/id10270/c/00003.wav", "id10270", 12.0, 16000, "test"),
    ]
    assert isinstance(utts[2].duration, float) and isinstance(utts[0].sample_rate, int)


def test_missing_manifest_names_it(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        read_manifest(str(tmp_path / "vox"))
    assert str(tmp_path / "vox" / "utterances.csv") in str(e.value)


@pytest.mark.parametrize("text", [MANIFEST.replace("8.12", "long"), MANIFEST.replace("sample_rate", "rate")])
def test_malformed_manifest_names_it(tmp_path, text):
    (tmp_path / "utterances.csv").write_text(text)
    with pytest.raises(ValueError, match="utterances.csv"):
        read_manifest(str(tmp_path))


def test_read_trials(tmp_path):
    path = tmp_path / "trials.txt"
    path.write_text("1 a.wav b.wav\n0 a.wav c.wav\n\ntarget d.wav e.wav\nnontarget d.wav f.wav\n")
    labels, enroll, test = read_trials(str(path))
    assert labels.dtype == np.int8
    assert labels.tolist() == [1, 0, 1, 0]
    assert enroll == ["a.wav", "a.wav", "d.wav", "d.wav"]
    assert test == ["b.wav", "c.wav", "e.wav", "f.wav"]


@pytest.mark.parametrize("bad", ["2 a.wav b.wav", "1 a.wav", "1 a.wav b.wav c.wav", "yes a.wav b.wav"])
def test_malformed_trial_line_names_file_and_line(tmp_path, bad):
    path = tmp_path / "trials.txt"
    path.write_text(f"1 a.wav b.wav\n0 a.wav c.wav\n{bad}\n")
    with pytest.raises(ValueError, match=f"{path}:3"):
        read_trials(str(path))


def test_empty_trial_list(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty.txt"):
        read_trials(str(path))


# ---------------------------------------------------------------- CropBatchSampler

def durations(n=400, seed=0):
    return np.random.default_rng(seed).uniform(1.0, 20.0, n)


def take(iterable, n):
    out = []
    for b in iterable:
        out.append(b)
        if len(out) == n:
            break
    return out


def test_batches_per_epoch_is_a_multiple():
    s = CropBatchSampler(durations(103), batch_size=4, min_secs=2, max_secs=3, seed=0, multiple=3)
    assert len(s) == 24  # 25 full batches, rounded down to a multiple of 3
    batches = list(s.epoch_batches(0))
    assert len(batches) == len(s)
    assert all(len(b) == 4 for b in batches)
    for multiple in (1, 2, 5, 7):
        assert len(CropBatchSampler(durations(103), 4, 2, 3, 0, multiple)) % multiple == 0


def test_too_few_utterances():
    with pytest.raises(ValueError):
        CropBatchSampler(durations(7), batch_size=4, min_secs=2, max_secs=3, seed=0, multiple=2)


def test_each_epoch_visits_each_utterance_at_most_once():
    s = CropBatchSampler(durations(103), batch_size=4, min_secs=2, max_secs=3, seed=0, multiple=3)
    for epoch in range(3):
        idx = [i for b in s.epoch_batches(epoch) for i, _, _ in b]
        assert len(idx) == len(set(idx)) == len(s) * 4
        assert all(0 <= i < 103 for i in idx)


def test_every_utterance_is_trained_on_over_epochs():
    # The dropped remainder of an epoch must be random. Today it is cut after sorting by length, so the
    # longest utterances of the last length bucket are dropped every epoch; a corpus of up to 100 batches
    # never trains on its longest ones at all.
    d = np.arange(1.0, 11.0)  # 10 utterances, batches of 3: one left out per epoch
    s = CropBatchSampler(d, batch_size=3, min_secs=2, max_secs=3, seed=0)
    seen = {i for epoch in range(30) for b in s.epoch_batches(epoch) for i, _, _ in b}
    assert seen == set(range(10))


def test_long_utterances_are_not_under_sampled():
    d = durations(1500, seed=5)
    s = CropBatchSampler(d, batch_size=10, min_secs=2, max_secs=3, seed=0, multiple=7)  # 147 batches: 30 left out
    visits = np.zeros(len(d))
    for epoch in range(40):
        np.add.at(visits, [i for b in s.epoch_batches(epoch) for i, _, _ in b], 1)
    order = np.argsort(d)
    # each utterance is kept with probability 1470/1500 per epoch, whatever its length
    assert abs(visits[order[-100:]].mean() - visits[order[:100]].mean()) < 2.0


def test_same_seed_same_batches():
    a = CropBatchSampler(durations(), 8, 2.0, 8.0, seed=7, multiple=2)
    b = CropBatchSampler(durations(), 8, 2.0, 8.0, seed=7, multiple=2)
    n = 3 * len(a)
    assert take(a, n) == take(b, n)


def test_different_seed_different_order():
    a = CropBatchSampler(durations(), 8, 2.0, 8.0, seed=7)
    b = CropBatchSampler(durations(), 8, 2.0, 8.0, seed=8)
    first_a, first_b = list(a.epoch_batches(0)), list(b.epoch_batches(0))
    assert [[i for i, _, _ in x] for x in first_a] != [[i for i, _, _ in x] for x in first_b]
    assert [x[0][1] for x in first_a] != [x[0][1] for x in first_b]


def test_crop_secs_within_bounds_one_per_batch():
    s = CropBatchSampler(durations(), 8, 2.0, 8.0, seed=0)
    secs = []
    for b in take(s, 2 * len(s)):
        assert len({c for _, c, _ in b}) == 1  # one crop length per batch: no padding
        secs.append(b[0][1])
        assert all(isinstance(seed, int) for _, _, seed in b)
    assert all(2.0 <= c <= 8.0 for c in secs)
    assert max(secs) - min(secs) > 3.0  # drawn across the range, not a constant


def test_endless_next_epoch_continues_in_another_order():
    s = CropBatchSampler(durations(), 8, 2.0, 8.0, seed=0)
    batches = take(s, 2 * len(s) + 1)
    assert len(batches) == 2 * len(s) + 1
    epoch0, epoch1 = batches[:len(s)], batches[len(s):2 * len(s)]
    assert epoch0 == list(s.epoch_batches(0))
    assert epoch1 == list(s.epoch_batches(1))
    assert [[i for i, _, _ in b] for b in epoch0] != [[i for i, _, _ in b] for b in epoch1]
    assert batches[-1] == next(iter(s.epoch_batches(2)))


def test_batches_group_similar_durations():
    d = durations(800, seed=3)
    s = CropBatchSampler(d, 8, 2.0, 8.0, seed=0)
    spread = np.mean([np.ptp(d[[i for i, _, _ in b]]) for b in s.epoch_batches(0)])
    random_batches = np.random.default_rng(0).permutation(800).reshape(-1, 8)
    random_spread = np.mean([np.ptp(d[b]) for b in random_batches])
    assert spread < 0.1 * random_spread


# ---------------------------------------------------------------- CropDataset

@pytest.fixture
def crop_data(tmp_path):
    long = write(tmp_path / "long.wav", ramp(SR))  # 1 s
    short = write(tmp_path / "short.wav", ramp(4000) + 0.5)  # 0.25 s
    low = write(tmp_path / "low.wav", np.full(8000, 0.2, np.float32), sr=8000)  # 1 s at 8 kHz
    utts = [Utterance("long", long, "spk0", 1.0, SR, "train"),
            Utterance("short", short, "spk1", 0.25, SR, "train"),
            Utterance("low", low, "spk1", 1.0, 8000, "train")]
    return CropDataset(utts, [0, 1, 1], SR)


@pytest.mark.parametrize("secs", [0.5, 0.3333, 0.61, 1.0])
def test_crop_has_exactly_the_requested_samples(crop_data, secs):
    for index in range(3):
        wav, label = crop_data[(index, secs, 123)]
        assert wav.shape == (round(secs * SR),)
        assert wav.dtype == torch.float32
        assert label == [0, 1, 1][index]


def test_crop_is_a_contiguous_slice_of_the_file(crop_data):
    x = ramp(SR)
    for seed in range(5):
        wav, _ = crop_data[(0, 0.5, seed)]
        start = int(round(float(wav[0]) * 2**16))
        np.testing.assert_array_equal(wav.numpy(), x[start:start + 8000])


def test_short_utterance_is_repeated_to_the_crop(crop_data):
    wav, label = crop_data[(1, 0.6, 5)]
    assert wav.shape == (9600,) and label == 1
    x = ramp(4000) + 0.5
    np.testing.assert_array_equal(wav[:4000].numpy(), x)
    np.testing.assert_array_equal(wav[4000:8000].numpy(), x)
    np.testing.assert_array_equal(wav[8000:].numpy(), x[:1600])


def test_same_seed_same_crop_different_seeds_different_offsets(crop_data):
    a, _ = crop_data[(0, 0.3, 42)]
    b, _ = crop_data[(0, 0.3, 42)]
    assert torch.equal(a, b)
    starts = {float(crop_data[(0, 0.3, seed)][0][0]) for seed in range(8)}
    assert len(starts) >= 6


def test_collate_crops(crop_data):
    wavs, lengths, labels = collate_crops([crop_data[(i, 0.5, i)] for i in range(3)])
    assert wavs.shape == (3, 8000)
    assert lengths.tolist() == [8000] * 3
    assert labels.tolist() == [0, 1, 1] and labels.dtype == torch.long


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
