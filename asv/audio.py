"""Reading audio: one reader for every stage (prepare, training, evaluation, augmentation, the API).

Formats libsndfile reads (wav, flac, ogg/opus, mp3) go through soundfile; VoxCeleb2's AAC .m4a
through PyAV: it is maintained and its wheels bundle FFmpeg, so it installs from PyPI with no
system libraries. libsndfile cannot decode AAC; torchaudio 2.11 has no audio I/O of its own (its
load needs torchcodec), and torchcodec needs a system FFmpeg.
"""
from __future__ import annotations

import os
import sys

import av
import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

AUDIO_EXTENSIONS = (".wav", ".flac", ".m4a", ".ogg", ".opus", ".mp3")  # what corpora, lists and folders may hold


class AudioError(ValueError):
    """A file that cannot be used as audio; the message names the file and the problem."""


def progress(iterable=None, total=None, desc=None, unit="it", enabled=True):
    """A tqdm bar with rate and ETA on an interactive terminal; nothing in logs, CI or non-main processes."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


def _uses_ffmpeg(path: str) -> bool:
    return path.lower().endswith(".m4a")


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
    records it).
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


def header_frames(path: str) -> tuple[int, int]:
    """(frames, sample_rate) from the header, nothing decoded: libsndfile, or FFmpeg for m4a."""
    if not _uses_ffmpeg(path):
        info = sf.info(path)
        return info.frames, info.samplerate
    with av.open(path, format="mp4") as container:  # naming m4a's demuxer skips format probing: -30% time
        stream = container.streams.audio[0] if container.streams.audio else None
        if stream is None or stream.duration is None:
            raise ValueError("no audio stream with a duration")
        rate = stream.codec_context.sample_rate
        return int(round(stream.duration * stream.time_base * rate)), rate  # as load_audio cuts it


def header_subtype(path: str) -> str:
    """libsndfile's sample format ('PCM_16', 'FLOAT', ...); '' for FFmpeg-read files."""
    return "" if _uses_ffmpeg(path) else sf.info(path).subtype


def load_audio(path: str, sample_rate: int, start_secs: float = 0.0, num_secs: float | None = None) -> torch.Tensor:
    """Read [start, start+num) seconds of a file as mono float32 at `sample_rate`: (T,).

    Whole files (num_secs None) must hold some sound; a silent crop of a file is fine.
    """
    if not os.path.isfile(path):
        raise AudioError(f"{path}: no such file")
    read = _read_av if _uses_ffmpeg(path) else _read_soundfile
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
    channels = wav.shape[1]
    mono = wav.mean(axis=1)  # several channels are averaged to mono
    # checked in NumPy: torch's any() is a parallel region, which costs ~20 ms a file when the cores are busy
    if num_secs is None and not mono.any():  # after the mix: channels that cancel are silent too
        mixed = f" once its {channels} channels are mixed to mono" if channels > 1 else ""
        raise AudioError(f"{path}: silent (every sample is zero{mixed})")
    wav = torch.from_numpy(mono)
    if sr != sample_rate:
        wav = AF.resample(wav, sr, sample_rate)
    return wav
