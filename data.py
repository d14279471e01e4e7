"""Reading what prepare_voxceleb.py wrote, and feeding audio to the models.

Training batches are random crops. One crop length is drawn per batch (between
min_secs and max_secs) and every utterance in the batch is cut to it, so training
batches carry no padding at all; utterances shorter than the crop are repeated to
fill it. Every random choice (order, crop length, crop offset) is a pure function of
(seed, epoch, position), so a resumed run sees exactly the batches an uninterrupted
run would, whatever the number of workers.

Evaluation batches are whole utterances sorted by length and packed up to a budget
of audio seconds, so padding stays small and memory is bounded by the budget.
"""
from __future__ import annotations

import csv
import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF


def progress(iterable=None, total=None, desc=None, unit="it", enabled=True):
    """A tqdm bar with rate and ETA on an interactive terminal; nothing in logs, CI or non-main processes."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


AUDIO_EXTENSIONS = (".wav", ".flac", ".m4a")  # what corpora, lists and folders may hold; .m4a: VoxCeleb2's AAC


class AudioError(ValueError):
    """A file that cannot be used as audio; the message names the file and the problem."""


# Formats libsndfile reads (wav, flac, ogg, ...) go through soundfile; anything else, VoxCeleb2's AAC .m4a
# first, through PyAV: it is maintained and its wheels bundle FFmpeg, so it installs from PyPI with no
# system libraries. libsndfile cannot decode AAC; torchaudio 2.11 has no FFmpeg I/O of its own (its load
# needs torchcodec), and torchcodec needs a system FFmpeg.
_SOUNDFILE_SUFFIXES = {f".{name.lower()}" for name in sf.available_formats()}


def _read_soundfile(path, start_secs, num_secs):
    """(samples (T, C) float32, rate); only the requested frames are decoded."""
    info = sf.info(path)
    start = int(round(start_secs * info.samplerate))
    frames = -1 if num_secs is None else int(round(num_secs * info.samplerate))
    return sf.read(path, start=start, frames=frames, dtype="float32", always_2d=True)


def _read_av(path, start_secs, num_secs):
    """(samples (T, C) float32, rate) through FFmpeg.

    Decodes from the start and slices rather than seeking: AAC frames overlap, so a sample-exact
    seek needs pre-roll frames, and VoxCeleb2 files are ~8 s (a full decode takes a few ms).
    FFmpeg drops the encoder's leading priming samples (the mp4 edit list) but not the padding
    of the last frame, so mp4 audio is cut at the exact length its header gives (as prepare
    records it); other containers' durations may be estimates, so they are not cut.
    """
    with av.open(path) as container:
        if not container.streams.audio:
            raise AudioError(f"{path}: no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        start = int(round(start_secs * rate))
        stop = None if num_secs is None else start + int(round(num_secs * rate))
        if "mp4" in container.format.name and stream.duration is not None:
            end = int(round(stream.duration * stream.time_base * rate))
            stop = end if stop is None else min(stop, end)
        to_float = av.AudioResampler(format="fltp")  # planar float32 whatever the codec's sample format
        chunks, decoded = [], 0
        for frame in container.decode(stream):
            for converted in to_float.resample(frame):
                chunks.append(converted.to_ndarray())  # (C, n)
                decoded += converted.samples
            if stop is not None and decoded >= stop:  # the rest of the file is not needed
                break
    if not chunks:
        return np.zeros((0, 1), np.float32), rate
    return np.concatenate(chunks, axis=1)[:, start:stop].T, rate


def header_frames(path):
    """(frames, sample_rate) from the header, nothing decoded: libsndfile for wav/flac, FFmpeg for m4a."""
    if not path.lower().endswith(".m4a"):
        info = sf.info(path)
        return info.frames, info.samplerate
    with av.open(path, format="mp4") as container:  # naming m4a's demuxer skips format probing: -30% time
        stream = container.streams.audio[0] if container.streams.audio else None
        if stream is None or stream.duration is None:
            raise ValueError("no audio stream with a duration")
        rate = stream.codec_context.sample_rate
        return int(round(stream.duration * stream.time_base * rate)), rate  # as data.load_audio cuts it


def load_audio(path: str, sample_rate: int, start_secs: float = 0.0, num_secs: float | None = None) -> torch.Tensor:
    """Read [start, start+num) seconds of a file as mono float32 at `sample_rate`: (T,)."""
    read = _read_soundfile if Path(path).suffix.lower() in _SOUNDFILE_SUFFIXES else _read_av
    try:
        wav, sr = read(path, start_secs, num_secs)  # (T, C)
    except (sf.LibsndfileError, av.FFmpegError, RuntimeError, OSError) as e:
        # FFmpeg's own message repeats the path: keep only its reason
        reason = getattr(e, "strerror", None) if isinstance(e, av.FFmpegError) else None
        raise AudioError(f"{path}: unreadable audio ({reason or str(e).splitlines()[-1]})") from None
    if wav.shape[0] == 0:
        raise AudioError(f"{path}: no audio samples")
    if not np.isfinite(wav).all():
        raise AudioError(f"{path}: audio contains NaN or inf samples")
    if num_secs is None and not wav.any():  # a whole file of zeros has no speaker (a silent crop is fine)
        raise AudioError(f"{path}: silent (every sample is zero)")
    wav = torch.from_numpy(wav.mean(axis=1))  # multi-channel files are averaged to mono
    if sr != sample_rate:
        wav = AF.resample(wav, sr, sample_rate)
    return wav


# ---------------------------------------------------------------------------- manifests

@dataclass
class Utterance:
    id: str
    path: str
    speaker: str
    duration: float
    sample_rate: int
    split: str


def read_manifest(data_dir: str) -> list[Utterance]:
    path = Path(data_dir) / "utterances.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; run prepare_voxceleb.py --out {data_dir} first")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        return [Utterance(r["id"], r["path"], r["speaker"], float(r["duration"]), int(r["sample_rate"]), r["split"])
                for r in rows]
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: malformed manifest ({e})") from None


def read_trials(path: str) -> tuple[np.ndarray, list[str], list[str]]:
    """A `label enroll test` file -> (labels (N,) int8, enroll paths, test paths)."""
    labels, enroll, test = [], [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 3 or parts[0] not in ("0", "1", "target", "nontarget"):
                raise ValueError(f"{path}:{n}: expected 'label enroll test' with label 1/0, got {line.strip()!r}")
            labels.append(parts[0] in ("1", "target"))
            enroll.append(parts[1])
            test.append(parts[2])
    if not labels:
        raise ValueError(f"{path}: empty trial list")
    return np.asarray(labels, dtype=np.int8), enroll, test


def trial_lists(data_dir: str) -> dict[str, Path]:
    """name -> file for every list in data_dir/trials; 'valid' is the validation list."""
    return {p.stem: p for p in sorted((Path(data_dir) / "trials").glob("*.txt"))}


# ---------------------------------------------------------------------------- training

SPEED_CLASS = {1.0: 0, 0.9: 1, 1.1: 2}  # speed-perturbed copies of a speaker are new classes


class CropBatchSampler:
    """Yields batches of (utterance index, crop secs, item seed); see the module docstring.

    Endless; each epoch is a seeded permutation; neighbouring utterances are grouped by length
    (buckets of 100 batches) so short utterances are rarely stretched much. The number
    of batches is a multiple of `multiple` (gradient accumulation x processes), so
    every epoch ends on an optimizer step and resuming never splits one.
    """

    def __init__(self, durations, batch_size, min_secs, max_secs, seed, multiple=1):
        self.durations = np.asarray(durations, dtype=np.float64)
        self.batch_size, self.min_secs, self.max_secs = batch_size, min_secs, max_secs
        self.seed, self.multiple = seed, multiple
        if len(self) == 0:
            raise ValueError(f"{len(self.durations)} training utterances cannot fill {multiple} batch(es) of {batch_size}")

    def __len__(self):
        """Batches per epoch."""
        n = len(self.durations) // self.batch_size
        return n - n % self.multiple

    def __iter__(self):
        """Endless: epoch after epoch, so the loader (and its workers) lives for the whole run."""
        for epoch in itertools.count():
            yield from self.epoch_batches(epoch)

    def epoch_batches(self, epoch: int):
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.durations))[: len(self) * self.batch_size]  # a random remainder sits out
        bucket = self.batch_size * 100
        for i in range(0, len(order), bucket):  # sort inside buckets so a batch holds similar lengths
            chunk = order[i:i + bucket]
            order[i:i + bucket] = chunk[np.argsort(self.durations[chunk], kind="stable")]
        batches = order.reshape(len(self), self.batch_size)
        batches = batches[rng.permutation(len(batches))]
        crop_secs = rng.uniform(self.min_secs, self.max_secs, size=len(batches))
        item_seeds = rng.integers(0, 2**31, size=batches.shape)
        for b, secs, seeds in zip(batches, crop_secs, item_seeds):
            yield [(int(i), float(secs), int(s)) for i, s in zip(b, seeds)]


class CropDataset(torch.utils.data.Dataset):
    """(index, crop secs, seed) -> (waveform (T,), speaker label).

    With an `augment.Augmenter`: speed perturbation (0.9 / 1.1 count as new speakers:
    label + num_speakers or + 2 x num_speakers), then reverberation and additive noise,
    all drawn from the item's own seed.
    """

    def __init__(self, utts: list[Utterance], labels: list[int], sample_rate: int, augmenter=None):
        self.utts, self.labels, self.sample_rate, self.augmenter = utts, labels, sample_rate, augmenter
        self.num_speakers = max(labels, default=-1) + 1

    def __len__(self):
        return len(self.utts)

    def __getitem__(self, item):
        index, secs, seed = item
        utt = self.utts[index]
        rng = np.random.default_rng(seed)
        factor = self.augmenter.speed_factor(rng) if self.augmenter else 1.0
        start = rng.uniform(0.0, max(utt.duration - secs * factor, 0.0))
        wav = load_audio(utt.path, self.sample_rate, start, secs * factor)  # only the crop is decoded
        if factor != 1.0:
            wav = self.augmenter.speed(wav, factor)
        need = int(round(secs * self.sample_rate))
        if wav.numel() < need:  # shorter than the crop: repeat it (no padding inside training batches)
            wav = wav.repeat(math.ceil(need / wav.numel()))
        wav = wav[:need]
        if self.augmenter:
            wav = self.augmenter(wav, rng)
        return wav, self.labels[index] + SPEED_CLASS[factor] * self.num_speakers


def collate_crops(items):
    wavs = torch.stack([w for w, _ in items])  # (B, T): equal lengths by construction
    lengths = torch.full((len(items),), wavs.shape[1], dtype=torch.long)
    labels = torch.tensor([y for _, y in items], dtype=torch.long)
    return wavs, lengths, labels


# ---------------------------------------------------------------------------- evaluation

def length_batches(durations, max_batch_secs: float) -> list[list[int]]:
    """Indices sorted by length (longest first) and packed so that batch size x longest <= budget."""
    order = np.argsort(-np.asarray(durations, dtype=np.float64), kind="stable")
    batches, current = [], []
    for i in order:
        longest = durations[current[0]] if current else durations[i]
        if current and longest * (len(current) + 1) > max_batch_secs:
            batches.append(current)
            current = []
        current.append(int(i))
    if current:
        batches.append(current)
    return batches


class UtteranceDataset(torch.utils.data.Dataset):
    """Whole utterances: index -> (waveform (T,), index). Too-short files are repeated to `min_samples`."""

    def __init__(self, paths: list[str], sample_rate: int, min_samples: int = 0):
        self.paths, self.sample_rate, self.min_samples = paths, sample_rate, min_samples

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        wav = load_audio(self.paths[index], self.sample_rate)
        if wav.numel() < self.min_samples:
            wav = wav.repeat(math.ceil(self.min_samples / wav.numel()))[: self.min_samples]
        return wav, index


def collate_padded(items):
    lengths = torch.tensor([w.numel() for w, _ in items], dtype=torch.long)
    wavs = torch.zeros(len(items), int(lengths.max()))
    for row, (w, _) in enumerate(items):
        wavs[row, : w.numel()] = w
    index = torch.tensor([i for _, i in items], dtype=torch.long)
    return wavs, lengths, index
