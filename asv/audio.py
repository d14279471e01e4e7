"""Reading audio: one reader for every stage (prepare, training, evaluation, augmentation, the API).

Formats libsndfile reads (wav, flac, ogg/opus, mp3) go through soundfile; VoxCeleb2's AAC .m4a
through PyAV: it is maintained and its wheels bundle FFmpeg, so it installs from PyPI with no
system libraries. libsndfile cannot decode AAC; torchaudio 2.11 has no audio I/O of its own (its
load needs torchcodec), and torchcodec needs a system FFmpeg.
"""
from __future__ import annotations

import math
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


def source_name(source) -> str:
    """A reader's source is a path or a file object (a shard's sample, io.BytesIO) with a `name`: the file it
    holds, which messages name and whose extension picks the decoder."""
    return source if isinstance(source, (str, os.PathLike)) else source.name


def _rewound(source):
    """A path as it is; a file object from its start, so that several reads of one object see the same file."""
    if not isinstance(source, (str, os.PathLike)):
        source.seek(0)
    return source


def _uses_ffmpeg(source) -> bool:
    return str(source_name(source)).lower().endswith(".m4a")


def _read_soundfile(path, window, int16_rate=None):
    """(samples (T, C), rate) of the frames window(rate, frames) -> (start, stop) names; only those are
    decoded. float32, or the file's own integers for a 16-bit PCM mono file at `int16_rate` (its
    float32 samples are exactly those / 32768: libsndfile scales by 1 / 0x8000)."""
    with sf.SoundFile(_rewound(path)) as f:
        start, stop = window(f.samplerate, f.frames)
        stop = f.frames if stop is None else min(stop, f.frames)
        f.seek(min(start, f.frames))
        pcm16 = f.samplerate == int16_rate and f.subtype == "PCM_16" and f.channels == 1
        dtype = "int16" if pcm16 else "float32"
        return f.read(max(stop - start, 0), dtype=dtype, always_2d=True), f.samplerate


def _read_av(path, window, int16_rate=None):
    """(samples (T, C) float32, rate) through FFmpeg, of the frames window(rate, frames) names.

    Decodes from the start and slices rather than seeking: AAC frames overlap, so a sample-exact
    seek needs pre-roll frames, and VoxCeleb2 files are ~8 s (a full decode takes a few ms).
    FFmpeg drops the encoder's leading priming samples (the mp4 edit list) but not the padding
    of the last frame, so mp4 audio is cut at the exact length its header gives (as prepare
    records it).
    """
    with av.open(_rewound(path)) as container:
        if not container.streams.audio:
            raise AudioError(f"{source_name(path)}: no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        end = None
        if "mp4" in container.format.name and stream.duration is not None:
            end = int(round(stream.duration * stream.time_base * rate))
        start, stop = window(rate, end)
        if end is not None:
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


def _decode(source, window, int16_rate=None) -> tuple[np.ndarray, int, int]:
    """(mono (T,), rate, channels) of the frames window(rate, frames) -> (start, stop or None) selects;
    `frames` may be None for a container that does not say (then stop None is the end).
    Checked: readable, some samples, all finite. Several channels are averaged. float32, or int16
    for a 16-bit PCM mono file at `int16_rate` (_read_soundfile). `source`: a path or a file object (source_name)."""
    path = source
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise AudioError(f"{source}: no such file")
    read = _read_av if _uses_ffmpeg(path) else _read_soundfile
    try:
        wav, sr = read(path, window, int16_rate)  # (T, C)
    except (sf.LibsndfileError, av.FFmpegError, RuntimeError, OSError) as e:
        # FFmpeg's own message repeats the path: keep only its reason
        reason = getattr(e, "strerror", None) if isinstance(e, av.FFmpegError) else None
        raise AudioError(f"{source_name(path)}: unreadable audio ({reason or str(e).splitlines()[-1]})") from None
    if wav.shape[0] == 0:
        raise AudioError(f"{source_name(path)}: no audio samples")
    if wav.dtype == np.float32 and not np.isfinite(wav).all():
        raise AudioError(f"{source_name(path)}: audio contains NaN or inf samples")
    # one channel: the samples as they are (the mean of one value is that value)
    return (wav[:, 0] if wav.shape[1] == 1 else wav.mean(axis=1)), sr, wav.shape[1]


def header_frames(path) -> tuple[int, int]:
    """(frames, sample_rate) from the header, nothing decoded: libsndfile, or FFmpeg for m4a. A path or a
    file object (source_name)."""
    if not _uses_ffmpeg(path):
        with sf.SoundFile(_rewound(path)) as f:  # sf.info takes paths only
            return f.frames, f.samplerate
    with av.open(_rewound(path), format="mp4") as container:  # naming m4a's demuxer skips format probing: -30% time
        stream = container.streams.audio[0] if container.streams.audio else None
        if stream is None or stream.duration is None:
            raise ValueError("no audio stream with a duration")
        rate = stream.codec_context.sample_rate
        return int(round(stream.duration * stream.time_base * rate)), rate  # as load_audio cuts it


def header_subtype(path: str) -> str:
    """libsndfile's sample format ('PCM_16', 'FLOAT', ...); '' for FFmpeg-read files."""
    return "" if _uses_ffmpeg(path) else sf.info(path).subtype


def load_audio(path, sample_rate: int, start_secs: float = 0.0, num_secs: float | None = None) -> torch.Tensor:
    """Read [start, start+num) seconds of a file as mono float32 at `sample_rate`: (T,).

    Whole files (num_secs None) must hold some sound; a silent crop of a file is fine. `path` may be a file
    object with a `name` (source_name): a shard's sample decodes exactly as its file.
    """
    def window(rate, frames):
        start = int(round(start_secs * rate))
        return start, None if num_secs is None else start + int(round(num_secs * rate))

    mono, sr, channels = _decode(path, window)
    # checked in NumPy: torch's any() is a parallel region, which costs ~20 ms a file when the cores are busy
    if num_secs is None and not mono.any():  # after the mix: channels that cancel are silent too
        mixed = f" once its {channels} channels are mixed to mono" if channels > 1 else ""
        raise AudioError(f"{source_name(path)}: silent (every sample is zero{mixed})")
    wav = torch.from_numpy(np.ascontiguousarray(mono))
    if sr != sample_rate:
        wav = AF.resample(wav, sr, sample_rate)
    return wav


_SCALE = 2.0**31  # SOX_SAMPLE_MAX + 1
_SAMPLE_MIN, _SAMPLE_MAX = -_SCALE, _SCALE - 1


def _to_sox(wav) -> np.ndarray:
    """float32 (T,) (tensor or array) -> SoX int32 samples held exactly in float64 (T,)."""
    x = np.asarray(wav.detach().cpu() if isinstance(wav, torch.Tensor) else wav).astype(np.float64) * _SCALE
    return np.clip(np.trunc(x), _SAMPLE_MIN, _SAMPLE_MAX)


def _from_sox(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((x / _SCALE).astype(np.float32))


SUPERB_RATE = 16000  # the rate SUPERB's effects run at (its audio is 16 kHz)
SUPERB_GAIN_DB = -3.0  # SUPERB's `gain -3`
SUPERB_SILENCE = (0.1, 0.001)  # SUPERB's `silence 1 0.1 0.1% -1 0.1 0.1%`: duration (s), threshold (of full scale)
SUPERB_EFFECTS = "gain -3; silence 1 0.1 0.1% -1 0.1 0.1%"  # as s3prl writes them


def _gain(x: np.ndarray, db: float) -> np.ndarray:
    # dB_to_linear as sox_i.h writes it, with libm's exp, so the factor is SoX's to the last bit.
    d = x * math.exp(db * math.log(10.0) * 0.05)
    return np.clip(np.trunc(np.where(d < 0, d - 0.5, d + 0.5)), _SAMPLE_MIN, _SAMPLE_MAX)


def _above(sums: np.ndarray, window: int, percent: float) -> np.ndarray:
    # Same operations as compute_rms + aboveThreshold: double sqrt, truncation to an integer
    # sample, division by SOX_SAMPLE_MAX.
    return np.trunc(np.sqrt(sums / window)) / _SAMPLE_MAX * 100.0 > percent


def _runs(mask: np.ndarray, length: int):
    """Starts, ends (exclusive) of the True runs of `mask`, and the indices of those >= length."""
    edges = np.diff(mask.astype(np.int8), prepend=0, append=0)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return starts, ends, np.flatnonzero(ends - starts >= length)


def _first_run(runs, pos: int, length: int):
    """First s >= pos such that [s, s + length) lies in one run, or None."""
    starts, ends, long = runs
    k = np.searchsorted(ends, pos, side="right")  # the first run ending after pos
    if k < len(starts) and max(starts[k], pos) + length <= ends[k]:
        return int(max(starts[k], pos))
    j = np.searchsorted(long, k + 1)
    return int(starts[long[j]]) if j < len(long) else None


def _keep_segments(x: np.ndarray, sample_rate: int, duration: float, threshold: float):
    """[(start, end)] of the SoX int32 samples x (T,) that `silence 1 d t -1 d t` keeps."""
    window = int(sample_rate / 50)
    hold = int(sample_rate * duration + 0.5)
    if window < 1 or hold < 1:
        raise ValueError(f"sample_rate {sample_rate} and duration {duration} leave no samples")
    percent = threshold * 100.0
    n = len(x)
    sq = x * x  # (T,)
    # Window sums as this block's prefix plus the previous block's tail: each sum only ever
    # adds up to 2 * window squares, so a loud file cannot swamp the quiet windows' precision.
    blocks = np.pad(sq, (0, -n % window)).reshape(-1, window).cumsum(axis=1)  # (B, W)
    sums = blocks.copy()
    sums[1:] += blocks[:-1, -1:] - blocks[:-1]
    above = _above(sums.reshape(-1)[:n], window, percent)  # (T,)
    above_runs, below_runs = _runs(above, hold), _runs(~above, hold)

    segments, pos = [], 0
    while pos < n:
        start = None
        if pos > 0:
            # TRIM after a cut starts with a zeroed window, so the first window - 1 decisions
            # use only the samples since pos; a run of `hold` may start among them.
            head = min(window - 1, n - pos)
            local = _above(np.cumsum(sq[pos:pos + head]), window, percent)
            mixed = np.concatenate([local, above[pos + head:pos + head + hold]])
            start = _first_run(_runs(mixed, hold), 0, hold)
            start = pos + start if start is not None and start < head else None
            pos += head
        if start is None:
            start = _first_run(above_runs, pos, hold)
        if start is None:
            break
        cut = _first_run(below_runs, start + hold, hold)
        if cut is None:
            segments.append((start, n))
            break
        segments.append((start, cut))
        pos = cut + hold
    return segments


def gain_db(wav: torch.Tensor, db: float) -> torch.Tensor:
    """SoX `gain <db>` on float32 (T,): scale, round to SoX's int32 samples, clip to full scale."""
    return _from_sox(_gain(_to_sox(wav), db))


def trim_silence(wav: torch.Tensor, sample_rate: int, duration: float = 0.1,
                 threshold: float = 0.001) -> torch.Tensor:
    """SoX `silence 1 <duration> <threshold> -1 <duration> <threshold>` on float32 (T,).

    `threshold` is a fraction of full scale (0.001 is SoX's 0.1%). Returns the kept samples (T',),
    possibly none.
    """
    segments = _keep_segments(_to_sox(wav), sample_rate, duration, threshold)
    return torch.cat([wav[:0]] + [wav[s:e] for s, e in segments])


def superb_effects(wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """s3prl's SUPERB ASV training chain on mono float32 (T,) at 16 kHz: gain -3 dB, then
    silence 1 0.1 0.1% -1 0.1 0.1%. Returns (T',), empty when everything is silence."""
    if sample_rate != 16000 or wav.dim() != 1:
        raise ValueError(f"expected mono (T,) audio at 16000 Hz, "
                         f"got {tuple(wav.shape)} at {sample_rate} Hz")
    x = _gain(_to_sox(wav), SUPERB_GAIN_DB)  # (T,)
    segments = _keep_segments(x, sample_rate, *SUPERB_SILENCE)
    return _from_sox(np.concatenate([x[:0]] + [x[s:e] for s, e in segments]))


def superb_intervals(wav: torch.Tensor, sample_rate: int) -> np.ndarray:
    """The [start, end) sample intervals (K, 2) of float32 (T,) audio that superb_effects keeps:
    superb_effects(wav) == gained(wav) cut to them (they depend on the file only, so they can be
    computed once and reused by every crop: trimmed_span)."""
    if sample_rate != SUPERB_RATE or wav.dim() != 1:
        raise ValueError(f"expected mono (T,) audio at 16000 Hz, got {tuple(wav.shape)} at {sample_rate} Hz")
    segments = _keep_segments(_gain(_to_sox(wav), SUPERB_GAIN_DB), sample_rate, *SUPERB_SILENCE)
    return np.asarray(segments, dtype=np.int64).reshape(-1, 2)


_GAIN_TABLES = {}  # gain dB -> what _gain makes of each 16-bit sample: one lookup per sample


def _gain_table(db: float) -> np.ndarray:
    """(65536,) float32, indexed by a 16-bit sample's bits read as uint16 (so no index arithmetic)."""
    if db not in _GAIN_TABLES:  # the very functions of the float path, applied to every 16-bit value
        every = (np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.float64) / 32768).astype(np.float32)
        _GAIN_TABLES[db] = _from_sox(_gain(_to_sox(every), db)).numpy()
    return _GAIN_TABLES[db]


def span_pieces(intervals: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Samples [start, stop) of the audio kept by `intervals` (K, 2) -> the file's [start, end) pieces
    (P, 2) that hold them, in order."""
    lengths = intervals[:, 1] - intervals[:, 0]
    ends = np.cumsum(lengths)  # kept samples up to each interval's end
    first = int(np.searchsorted(ends, start, side="right"))
    last = int(np.searchsorted(ends, stop, side="left"))  # the interval holding sample stop - 1
    pieces = intervals[first:last + 1].copy()
    begins = ends - lengths  # kept samples before each interval
    pieces[0, 0] += start - begins[first]
    pieces[-1, 1] = intervals[last, 0] + stop - begins[last]
    return pieces


def trimmed_span(path, sample_rate: int, intervals: np.ndarray, db: float | None, start: int,
                 stop: int) -> torch.Tensor:
    """Samples [start, stop) of a file once gained by `db` (None: no gain) and cut to `intervals` (file
    samples at `sample_rate`): with superb_intervals' intervals and SUPERB_GAIN_DB, exactly
    superb_effects(load_audio(path, sample_rate), sample_rate)[start:stop], sample for sample.

    Only the frames from the first piece's start to the last one's end are decoded when the file is
    at `sample_rate` (its samples are the file's own); a file at another rate is decoded and resampled
    whole, since a resampled span's edges would differ from the whole file's. `path` may be a file object
    (source_name).
    """
    if not 0 <= start < stop <= int((intervals[:, 1] - intervals[:, 0]).sum()):
        raise ValueError(f"{source_name(path)}: samples [{start}, {stop}) are not in its kept audio")
    pieces = span_pieces(intervals, start, stop)
    lo, hi = int(pieces[0, 0]), int(pieces[-1, 1])

    def window(rate, frames):
        return (lo, hi) if rate == sample_rate else (0, None)

    wav, rate, _ = _decode(path, window, sample_rate if db is not None else None)
    if rate != sample_rate:  # whole file, as load_audio reads it
        wav = AF.resample(torch.from_numpy(np.ascontiguousarray(wav)), rate, sample_rate).numpy()[lo:hi]
    if len(wav) != hi - lo:
        raise AudioError(f"{source_name(path)}: {len(wav)} samples where [{lo}, {hi}) was expected: "
                         "has the file changed?")
    if len(pieces) > 1:  # the kept pieces first: the gain is elementwise, so it may come after the cut
        wav = np.concatenate([wav[s - lo:e - lo] for s, e in pieces])
    if db is not None and wav.dtype == np.int16:  # the float chain's result for each 16-bit value, looked up
        wav = np.take(_gain_table(db), wav.view(np.uint16))
    elif db is not None:
        wav = _from_sox(_gain(_to_sox(wav), db)).numpy()
    return torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
