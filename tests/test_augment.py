"""Checks of asv/augment.py: noise/music/babble at the configured SNR, reverberation, speed, SpecAugment."""
import numpy as np
import pytest
import soundfile as sf
import torch

from asv.audio import AudioError
from asv.augment import Augmenter, spec_augment
from asv.config import AugmentConfig

SR = 16000


def write(path, data, sr=SR):
    path.parent.mkdir(parents=True, exist_ok=True)
    subtype = "PCM_24" if path.suffix == ".flac" else "FLOAT"  # FLAC holds integer samples only
    sf.write(str(path), np.asarray(data, dtype=np.float32), sr, subtype=subtype)


def tone(freq, secs, sr=SR, amp=0.5):
    return amp * np.sin(2 * np.pi * freq * np.arange(int(secs * sr)) / sr)


def make_musan(root, categories=("noise", "music", "speech")):
    """A tiny MUSAN: short and 8 kHz noise, tones for music, amplitude-modulated noise for 'speech'."""
    rng = np.random.default_rng(0)
    if "noise" in categories:
        write(root / "noise" / "white_short.wav", rng.normal(0, 0.1, int(0.3 * SR)))  # shorter than a crop: tiled
        write(root / "noise" / "sub" / "white_8k.flac", rng.normal(0, 0.3, 2 * 8000), sr=8000)
    if "music" in categories:
        write(root / "music" / "a.wav", tone(440, 2) + tone(660, 2, amp=0.2))
        write(root / "music" / "b.flac", tone(220, 1.5, amp=0.8))
    if "speech" in categories:
        for i in range(4):
            envelope = 0.5 + 0.5 * np.sin(2 * np.pi * (3 + i) * np.arange(SR) / SR)
            write(root / "speech" / f"s{i}.wav", (i + 1) * 0.05 * envelope * rng.normal(0, 1, SR))
    return str(root)


def decaying_rir(delay=50, n=4000):
    rng = np.random.default_rng(1)
    rir = 0.1 * rng.normal(0, 1, n) * np.exp(-np.arange(n) / 600.0)
    rir[:delay] = 0.0
    rir[delay] = 1.0  # the direct path: the largest tap
    return rir


@pytest.fixture
def clean():
    rng = np.random.default_rng(5)
    return torch.from_numpy((tone(300, 1.0) + rng.normal(0, 0.05, SR)).astype(np.float32))  # (T,)


def snr_db(clean, out):
    return 10 * np.log10(clean.pow(2).mean().item() / (out - clean).pow(2).mean().item())


# ---------------------------------------------------------------- folders

def test_categories_come_from_the_first_folder(tmp_path):
    root = make_musan(tmp_path / "musan")
    write(tmp_path / "musan" / "loose.wav", np.ones(100))  # outside the category folders: counts as noise
    aug = Augmenter(AugmentConfig(noise_dir=root, noise_prob=1.0), SR)
    assert {k: len(v) for k, v in aug.noise.items()} == {"noise": 3, "music": 2, "speech": 4}


def test_folder_without_audio_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no audio here")
    with pytest.raises(ValueError, match="empty"):
        Augmenter(AugmentConfig(noise_dir=str(tmp_path / "empty"), noise_prob=0.5), SR)
    with pytest.raises(ValueError, match="rirs_missing"):
        Augmenter(AugmentConfig(rir_dir=str(tmp_path / "rirs_missing"), rir_prob=0.5), SR)
    with pytest.raises(ValueError, match="rir_dir"):  # a probability without its folder
        Augmenter(AugmentConfig(rir_prob=0.5), SR)


def test_every_audio_format_counts_and_a_broken_file_is_named(tmp_path, clean):
    root = tmp_path / "musan"
    write(root / "noise" / "a.wav", np.random.default_rng(0).normal(0, 0.1, SR))
    sf.write(str(root / "noise" / "b.ogg"), np.random.default_rng(1).normal(0, 0.1, SR).astype(np.float32), SR,
             format="OGG", subtype="VORBIS")
    (root / "noise" / "c.flac").write_bytes(b"not audio at all")
    aug = Augmenter(AugmentConfig(noise_dir=str(root), noise_prob=1.0), SR)
    assert [p.name for p in aug.noise["noise"]] == ["a.wav", "b.ogg", "c.flac"]
    with pytest.raises(AudioError, match="c.flac: unreadable augmentation audio"):
        for seed in range(30):  # sooner or later the broken file is drawn
            aug(clean, np.random.default_rng(seed))


# ---------------------------------------------------------------- additive noise

@pytest.mark.parametrize("category,snr_range", [("noise", (0, 15)), ("music", (5, 15)), ("speech", (13, 20))])
def test_snr_is_within_the_category_range(tmp_path, clean, category, snr_range):
    root = make_musan(tmp_path / "musan", categories=(category,))
    aug = Augmenter(AugmentConfig(noise_dir=root, noise_prob=1.0), SR)
    measured = []
    for seed in range(8):
        out = aug(clean, np.random.default_rng(seed))
        assert out.shape == clean.shape and torch.isfinite(out).all()
        measured.append(snr_db(clean, out))
    assert all(snr_range[0] - 0.01 <= m <= snr_range[1] + 0.01 for m in measured), measured
    assert np.ptp(measured) > 1.0  # the SNR is drawn per crop, not fixed


def test_only_the_needed_segment_is_decoded(tmp_path, clean, monkeypatch):
    write(tmp_path / "long" / "noise" / "long.wav", np.random.default_rng(0).normal(0, 0.1, 20 * SR))
    reads = []
    real_read = sf.SoundFile.read
    monkeypatch.setattr(sf.SoundFile, "read",  # asv.audio's: one open, seek, read the frames asked
                        lambda self, frames=-1, *a, **k: reads.append(frames) or real_read(self, frames, *a, **k))
    aug = Augmenter(AugmentConfig(noise_dir=str(tmp_path / "long"), noise_prob=1.0), SR)
    aug(clean, np.random.default_rng(0))
    assert reads and all(0 < f <= clean.numel() + 1 for f in reads)


def test_silent_crop_and_prob_zero_are_unchanged(tmp_path, clean):
    root = make_musan(tmp_path / "musan")
    write(tmp_path / "rirs" / "r.wav", decaying_rir())
    off = Augmenter(AugmentConfig(noise_dir=root, rir_dir=str(tmp_path / "rirs")), SR)
    assert torch.equal(off(clean, np.random.default_rng(0)), clean)
    on = Augmenter(AugmentConfig(noise_dir=root, noise_prob=1.0), SR)
    silence = torch.zeros(SR)
    assert torch.equal(on(silence, np.random.default_rng(0)), silence)


def test_same_seed_same_output(tmp_path, clean):
    root = make_musan(tmp_path / "musan")
    write(tmp_path / "rirs" / "r.wav", decaying_rir())
    aug = Augmenter(AugmentConfig(noise_dir=root, noise_prob=1.0, rir_dir=str(tmp_path / "rirs"), rir_prob=1.0), SR)
    a = aug(clean, np.random.default_rng(42))
    b = aug(clean, np.random.default_rng(42))
    c = aug(clean, np.random.default_rng(43))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- reverberation

def test_delta_rir_keeps_the_signal_aligned(tmp_path, clean):
    delta = np.zeros(1000)
    delta[100] = 0.25  # any scale: the RIR is normalised to unit energy
    write(tmp_path / "rirs" / "delta.wav", delta)
    aug = Augmenter(AugmentConfig(rir_dir=str(tmp_path / "rirs"), rir_prob=1.0), SR)
    out = aug(clean, np.random.default_rng(0))
    assert out.shape == clean.shape
    # tolerance: noise at a gain of ~0 leaves float32 rounding of O(1) samples (~1e-7); 1e-5 is margin
    torch.testing.assert_close(out, clean, atol=1e-5, rtol=0)


def test_decaying_rir_reverberates(tmp_path, clean):
    stereo_8k = np.stack([decaying_rir(n=2000), np.zeros(2000)], axis=1)  # channels averaged (asv.audio), resampled to 16k
    write(tmp_path / "rirs" / "room" / "deep" / "r.flac", stereo_8k, sr=8000)
    aug = Augmenter(AugmentConfig(rir_dir=str(tmp_path / "rirs"), rir_prob=1.0), SR)
    out = aug(clean, np.random.default_rng(0))
    assert out.shape == clean.shape and torch.isfinite(out).all()
    assert (out - clean).abs().max() > 0.05
    # the direct path stays at lag 0: for white input, the output correlates best with the unshifted input
    white = torch.from_numpy(np.random.default_rng(2).normal(0, 0.1, SR).astype(np.float32))
    out = aug(white, np.random.default_rng(0))
    lags = range(-40, 41)
    corr = [float(torch.dot(out[100:-100], white[100 + k:SR - 100 + k])) for k in lags]
    assert list(lags)[int(np.argmax(corr))] == 0


# ---------------------------------------------------------------- speed

def dominant_hz(wav):
    return float(np.argmax(np.abs(np.fft.rfft(wav.numpy())))) * SR / wav.numel()


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_changes_length_and_pitch(factor):
    aug = Augmenter(AugmentConfig(speed_prob=1.0), SR)
    wav = torch.from_numpy(tone(440, 1.0).astype(np.float32))
    out = aug.speed(wav, factor)
    assert abs(out.numel() - SR / factor) <= 2  # 1.1: shorter (faster)
    # tolerance: the peak of a 1 s FFT has 1 Hz bins: +-2 Hz is two bins
    assert dominant_hz(out) == pytest.approx(440 * factor, abs=2)  # 1.1: higher pitch, as sox speed
    assert aug.speed(wav, 1.0) is wav


def test_speed_factor_follows_the_probability():
    assert {Augmenter(AugmentConfig(), SR).speed_factor(np.random.default_rng(s)) for s in range(20)} == {1.0}
    on = Augmenter(AugmentConfig(speed_prob=1.0), SR)
    assert {on.speed_factor(np.random.default_rng(s)) for s in range(20)} == {0.9, 1.1}


# ---------------------------------------------------------------- SpecAugment

def test_spec_augment_masks_only_valid_frames():
    feats = torch.randn(4, 50, 20, generator=torch.Generator().manual_seed(0)) + 3.0  # (B, T, F), no zeros
    lengths = torch.tensor([50, 30, 10, 40])
    cfg = AugmentConfig(specaug_prob=1.0, specaug_time_masks=2, specaug_time_width=5,
                        specaug_freq_masks=2, specaug_freq_width=4)
    before = feats.clone()
    out = spec_augment(feats, lengths, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(feats, before)  # the input is not modified
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(out[b, n:], feats[b, n:])  # padded frames untouched
        zero = out[b, :n] == 0  # (n, F)
        assert zero.all(dim=1).any()  # some valid frames zeroed across all bins (time mask)
        assert zero.all(dim=0).any()  # some bins zeroed across all valid frames (frequency mask)
        assert not zero.all()
        kept = ~zero
        assert torch.equal(out[b, :n][kept], feats[b, :n][kept])
    again = spec_augment(feats, lengths, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_spec_augment_prob_zero_is_unchanged():
    feats = torch.randn(2, 30, 8)
    out = spec_augment(feats, torch.tensor([30, 20]), AugmentConfig(specaug_prob=0.0))
    assert torch.equal(out, feats)


def test_reverberation_is_the_linear_convolution(tmp_path):
    """The FFT at a fast length (not the convolution's own) still gives the linear convolution: every kept
    sample against NumPy's direct float64 sum, for crop and RIR lengths whose convolution has a large prime factor."""
    rir = decaying_rir(delay=30, n=3001)
    write(tmp_path / "rirs" / "r.wav", rir)
    aug = Augmenter(AugmentConfig(rir_dir=str(tmp_path / "rirs"), rir_prob=1.0), SR)
    wav = torch.from_numpy(np.random.default_rng(5).normal(0, 0.1, 12_997).astype(np.float32))
    out = aug.reverberate(wav, np.random.default_rng(0))
    stored = sf.read(tmp_path / "rirs" / "r.wav", dtype="float32")[0].astype(np.float64)  # as the file holds it
    unit = stored / np.sqrt((stored ** 2).sum())
    want = np.convolve(wav.numpy().astype(np.float64), unit)[30:30 + wav.numel()]
    # float32 FFT of ~16k points: error ~ eps * log2(N) * the energy of the terms, well under 1e-5 here
    np.testing.assert_allclose(out.numpy(), want, atol=1e-5 * np.abs(want).max(), rtol=0)
