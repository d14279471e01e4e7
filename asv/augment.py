"""On-the-fly data augmentation for speaker-verification training (Kaldi/WeSpeaker recipe).

Waveform ops run in the dataset workers, after the crop is cut:

    aug = Augmenter(cfg.augment, sample_rate)      # once per dataset: scans the folders, loads nothing
    wav = aug(wav, rng)                             # (T,) -> (T,): reverberation, then additive noise

Speed perturbation (`speed_factor`, `speed`) changes the length and the pitch, so the
caller treats each factor as a new speaker. `spec_augment` masks upstream features
(B, T, F) in the training step. Every random choice comes from the generator passed
in, so the same seed gives the same augmented crop in any worker.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as AF

from .audio import AUDIO_EXTENSIONS, AudioError, header_frames, load_audio
from .config import AugmentConfig

NOISE_CATEGORIES = ("noise", "music", "speech")  # MUSAN subfolders; 'speech' files make babble


def _scan(folder: str, what: str) -> list[Path]:
    """Every wav/flac under `folder`, sorted so that the same seed picks the same file on any machine."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"{what} folder {folder} has no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    return files


def fast_fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n. An FFT of a length with a large prime factor is several times slower:
    an 8 s crop with a 0.5 s RIR (135,999 samples) takes 33 ms on one core, at 138,240 5 ms
    (benchmarks/bench_loader.py: reverberation was most of an augmented example's time)."""
    size = n
    while True:
        rest = size
        for p in (2, 3, 5):
            while rest % p == 0:
                rest //= p
        if rest == 1:
            return size
        size += 1


class Augmenter:
    """Reverberation and additive noise on one training crop; files are read lazily, segment by segment."""

    def __init__(self, cfg: AugmentConfig, sample_rate: int):
        self.cfg, self.sample_rate = cfg, sample_rate
        self.noise: dict[str, list[Path]] = {}  # category -> files; only categories that have files
        if cfg.noise_dir:
            for path in _scan(cfg.noise_dir, "augment.noise_dir"):
                first = path.relative_to(cfg.noise_dir).parts[0]  # noise/, music/ or speech/; anything else is noise
                category = first if first in NOISE_CATEGORIES else "noise"
                self.noise.setdefault(category, []).append(path)
        self.rirs = _scan(cfg.rir_dir, "augment.rir_dir") if cfg.rir_dir else []
        # A probability without its folder is a config mistake, not a request to skip the op.
        for prob, folder in (("noise_prob", "noise_dir"), ("rir_prob", "rir_dir")):
            if getattr(cfg, prob) > 0 and not getattr(cfg, folder):
                raise ValueError(f"augment.{prob} = {getattr(cfg, prob)} needs augment.{folder}")
        if not 1 <= cfg.babble_speakers_min <= cfg.babble_speakers_max:
            raise ValueError("augment.babble_speakers_min/max must satisfy 1 <= min <= max")
        self.snr_ranges = {"noise": (cfg.noise_snr_min, cfg.noise_snr_max),
                           "music": (cfg.music_snr_min, cfg.music_snr_max),
                           "speech": (cfg.babble_snr_min, cfg.babble_snr_max)}
        self._info: dict[Path, tuple[int, int]] = {}  # path -> (frames, rate)

    # ------------------------------------------------------------------ reading
    def _header(self, path: Path) -> tuple[int, int]:
        """(frames, sample rate), cached: each worker reads a file's header once."""
        if path not in self._info:
            try:
                self._info[path] = header_frames(str(path))
            except Exception as e:
                raise AudioError(f"{path}: unreadable augmentation audio ({str(e).splitlines()[-1]})") from None
        return self._info[path]

    def _segment(self, path: Path, num: int, rng: np.random.Generator) -> torch.Tensor:
        """A random `num`-sample stretch of a file at self.sample_rate; short files are tiled: (num,)."""
        frames, sr = self._header(path)
        need = math.ceil(num * sr / self.sample_rate) + 1  # at the file's rate; +1 covers resampling rounding
        start = int(rng.integers(0, frames - need + 1)) if frames > need else 0
        # MUSAN is ~11 GB: decode only what is used
        wav = load_audio(str(path), self.sample_rate, start / sr, min(need, frames) / sr)
        if wav.numel() < num:
            wav = wav.repeat(math.ceil(num / max(wav.numel(), 1)))
        return wav[:num]

    # ------------------------------------------------------------------ ops
    def reverberate(self, wav: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Convolve with a random RIR, keeping the direct path where the dry sound was: (T,) -> (T,)."""
        path = self.rirs[int(rng.integers(len(self.rirs)))]
        frames, sr = self._header(path)
        rir = load_audio(str(path), self.sample_rate, 0.0, frames / sr)  # RIRs are short: whole (a silent one is fine)
        energy = rir.pow(2).sum()
        if not torch.isfinite(energy) or energy == 0:
            return wav  # a silent or broken RIR would zero the crop
        rir = rir / energy.sqrt()  # unit energy: the crop's level stays about the same
        peak = int(rir.abs().argmax())  # direct path; shifting by it keeps the speech aligned with the crop
        n = wav.numel() + rir.numel() - 1  # the linear convolution's length
        size = fast_fft_size(n)  # >= n: no wrap-around reaches the samples kept
        full = torch.fft.irfft(torch.fft.rfft(wav, size) * torch.fft.rfft(rir, size), size)
        return full[peak:peak + wav.numel()]

    def add_noise(self, wav: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Add noise, music or babble at a random SNR of its category: (T,) -> (T,)."""
        power = wav.pow(2).mean()
        if power == 0:
            return wav  # no SNR is defined for silence
        category = sorted(self.noise)[int(rng.integers(len(self.noise)))]
        files, num = self.noise[category], wav.numel()
        if category == "speech":  # babble: several talkers at once, each at unit power so none dominates
            lo, hi = self.cfg.babble_speakers_min, self.cfg.babble_speakers_max
            noise = torch.zeros_like(wav)
            for _ in range(int(rng.integers(lo, hi + 1))):
                seg = self._segment(files[int(rng.integers(len(files)))], num, rng)
                noise += seg / seg.pow(2).mean().sqrt().clamp_min(1e-8)
        else:
            noise = self._segment(files[int(rng.integers(len(files)))], num, rng)
        lo, hi = self.snr_ranges[category]
        snr_db = rng.uniform(lo, hi)
        noise_power = noise.pow(2).mean()
        if noise_power == 0:
            return wav  # a silent noise file cannot reach any SNR
        # SNR = 10 log10(P_signal / P_noise): scale the noise power to P_signal / 10^(snr/10)
        scale = torch.sqrt(power / (noise_power * 10 ** (snr_db / 10)))
        return wav + scale * noise

    def __call__(self, wav: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """(T,) -> (T,): reverberation then additive noise, each with its probability."""
        # Both coins are tossed every time, so switching one op off does not change the other's draws.
        do_rir = rng.random() < self.cfg.rir_prob and bool(self.rirs)
        do_noise = rng.random() < self.cfg.noise_prob and bool(self.noise)
        if do_rir:
            wav = self.reverberate(wav, rng)
        if do_noise:
            wav = self.add_noise(wav, rng)
        return wav

    # ------------------------------------------------------------------ speed
    def speed_factor(self, rng: np.random.Generator) -> float:
        """1.0, or 0.9 / 1.1 with probability speed_prob (half each)."""
        if rng.random() < self.cfg.speed_prob:
            return float(rng.choice([0.9, 1.1]))
        return 1.0

    def speed(self, wav: torch.Tensor, factor: float) -> torch.Tensor:
        """sox `speed`: factor 1.1 -> T/1.1 samples, faster and higher pitched: (T,) -> (~T/factor,)."""
        if factor == 1.0:
            return wav
        # Read the samples as if recorded at sr*factor and resample to sr. This orientation keeps
        # the rate ratio small (17600/16000 = 11/10), so the sinc kernel stays short.
        return AF.resample(wav, int(round(self.sample_rate * factor)), self.sample_rate)


def spec_augment(feats: torch.Tensor, lengths: torch.Tensor, cfg: AugmentConfig,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero random time and frequency bands of (B, T, F) features (lengths: valid frames per row).

    Zero is the mean of mean-normalised features. Padded frames are never touched. Returns a new tensor.
    """
    B, T, F = feats.shape
    if cfg.specaug_prob <= 0:
        return feats

    # every uniform [0, 1) draw of the batch at once, on the CPU generator, in the order they are used
    # (one draw of B per mask's width, its start, then `chosen`: the same numbers as B at a time), and
    # ONE copy to the features' device: from pageable memory each copy would wait for the device
    time_masks = cfg.specaug_time_masks if cfg.specaug_time_width > 0 else 0
    freq_masks = cfg.specaug_freq_masks if cfg.specaug_freq_width > 0 else 0
    draws = torch.rand(2 * time_masks + 2 * freq_masks + 1, B, generator=generator)
    if feats.is_cuda:
        draws = draws.pin_memory()
    rand = iter(draws.to(feats.device, non_blocking=True))  # next(rand): the next (B,) draw

    lengths = lengths.to(feats.device).long()
    t = torch.arange(T, device=feats.device)[None, :]  # (1, T)
    f = torch.arange(F, device=feats.device)[None, :]  # (1, F)
    time_mask = torch.zeros(B, T, dtype=torch.bool, device=feats.device)
    freq_mask = torch.zeros(B, F, dtype=torch.bool, device=feats.device)
    for _ in range(time_masks):
        width = torch.minimum((next(rand) * cfg.specaug_time_width).long() + 1, lengths)  # (B,) in 1..W, <= length
        start = (next(rand) * (lengths - width + 1)).long()  # (B,): the mask ends inside the valid frames
        time_mask |= (t >= start[:, None]) & (t < (start + width)[:, None])
    for _ in range(freq_masks):
        width = ((next(rand) * cfg.specaug_freq_width).long() + 1).clamp_max(F)
        start = (next(rand) * (F - width + 1)).long()
        freq_mask |= (f >= start[:, None]) & (f < (start + width)[:, None])
    chosen = next(rand) < cfg.specaug_prob  # (B,): utterances that get masks at all
    valid = t < lengths[:, None]  # (B, T)
    mask = (time_mask[:, :, None] | freq_mask[:, None, :]) & (valid & chosen[:, None])[:, :, None]  # (B, T, F)
    return feats.masked_fill(mask, 0.0)
