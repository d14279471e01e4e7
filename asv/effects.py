"""s3prl's SUPERB ASV training effect chain without SoX.

s3prl applies ``channels 1, rate 16000, gain -3.0, silence 1 0.1 0.1% -1 0.1 0.1%`` to every
training file. The first two are the caller's job (mono, 16 kHz); this module reproduces the
other two as SoX 14.4.2 computes them (src/gain.c, src/silence.c), on SoX's own int32 samples:

- input: a float32 sample becomes ``trunc(x * 2**31)`` clipped to int32 (SOX_FLOAT_32BIT_TO_SAMPLE);
- ``gain``: ``x * 10**(dB/20)`` rounded half away from zero, clipped to int32 (-3 dB never clips);
- ``silence``: RMS over a trailing window of ``rate/50`` samples (20 ms, the current sample
  included, samples before the start counting as zeros), truncated to an integer and above the
  threshold when ``rms / (2**31 - 1) * 100 > threshold_percent`` (strictly; threshold in % of
  full scale, applied after the gain). ``duration`` is ``round(rate * seconds)`` samples (1600).

  TRIM: drop samples until ``duration`` consecutive ones are above; keep that run (the audio
  restarts at its first sample) and switch to COPY; the RMS window carries on.
  COPY: copy samples; a run of below samples is held back and copied when an above sample
  follows; once it reaches ``duration`` samples it is dropped, the RMS window is zeroed and TRIM
  restarts at the next sample, dropping the rest of the pause. So a pause whose below run
  reaches ``duration`` is cut whole (no ``-l``), at the start, in the middle or at the end.
  As the window trails, the 20 ms after a loud stretch still count as above: digital silence
  is cut when it lasts ``duration + window - 1`` samples (1919 at 16 kHz) or more.
  At the end, a held-back run shorter than ``duration`` is kept (COPY) and an unfinished above
  run is dropped (TRIM).

Decisions follow SoX's arithmetic operation for operation, except that window sums are block
prefix sums rather than SoX's running double sum (same value up to a few ulps). Output samples
are ``int32 / 2**31`` rounded to float32; the sox CLI's float writer rounds to multiples of
2**-24 instead, at most one float32 step (6e-8) away.
"""

import math

import numpy as np
import torch

_SCALE = 2.0**31  # SOX_SAMPLE_MAX + 1
_SAMPLE_MIN, _SAMPLE_MAX = -_SCALE, _SCALE - 1


def _to_sox(wav: torch.Tensor) -> np.ndarray:
    """float32 (T,) -> SoX int32 samples held exactly in float64 (T,)."""
    x = wav.detach().cpu().numpy().astype(np.float64) * _SCALE
    return np.clip(np.trunc(x), _SAMPLE_MIN, _SAMPLE_MAX)


def _from_sox(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((x / _SCALE).astype(np.float32))


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
    x = _gain(_to_sox(wav), -3.0)  # (T,)
    segments = _keep_segments(x, sample_rate, 0.1, 0.001)
    return _from_sox(np.concatenate([x[:0]] + [x[s:e] for s, e in segments]))
