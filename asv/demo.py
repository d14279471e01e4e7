"""A synthetic demo corpus: 40 voices x 3 sessions x 4 utterances, in VoxCeleb's layout.

Each voice has its own pitch, vocal tract, vowel qualities, glottal source and speaking rate;
each session its own microphone and room (a random smooth equaliser), so same-speaker trials
cross channels as in VoxCeleb. It exists so that the whole pipeline runs in a minute with no
download; the speech is not real, so figures on it say that the code works, not how well.
"""
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

from .run import atomic_write

DEMO_SR = 16000
# F1-F3 (Hz) of five vowels /a i u e o/ for an adult male vocal tract.
VOWELS = np.array([[730, 1090, 2440], [270, 2290, 3010], [300, 870, 2240],
                   [530, 1840, 2480], [570, 840, 2410]], dtype=float)


def spectral_filter(x, gain):
    """Filter x by a zero-phase gain(frequency_hz) in the FFT domain (no scipy needed)."""
    size = 1 << (len(x) - 1).bit_length()  # a power of two: odd lengths make FFTs slow
    freqs = np.fft.rfftfreq(size, 1 / DEMO_SR)
    return np.fft.irfft(np.fft.rfft(x, size) * gain(freqs), size)[:len(x)]


def resonators(formants, bandwidths):
    """Gain of a cascade of two-pole resonators (unit gain at 0 Hz): a vocal tract."""
    def gain(f):
        f = f[:, None]
        return np.prod(formants ** 2 / np.hypot(formants ** 2 - f ** 2, bandwidths * f), axis=1)
    return gain


def random_eq(rng, db, cutoff):
    """A smooth random gain curve (+-db at 8 points over log frequency) and a low-pass: a channel."""
    knots_db = rng.normal(0, db, 8)
    def gain(f):
        octaves = np.log2(np.maximum(f, 50) / 50)  # 0..7.3 over 50 Hz..8 kHz
        curve_db = np.interp(octaves, np.linspace(0, 7.3, 8), knots_db)
        return 10 ** (curve_db / 20) / np.sqrt(1 + (f / cutoff) ** 8)
    return gain


def demo_speaker(rng):
    """The traits that make a synthetic voice recognisable."""
    return {
        "f0": rng.uniform(90, 250),                      # mean pitch, Hz
        "vtl": rng.uniform(0.8, 1.2),                    # formant scale (shorter tract: higher)
        "accent": rng.uniform(0.9, 1.1, VOWELS.shape),   # the speaker's own vowel qualities
        "f4": rng.uniform(3300, 4200),                   # upper formant, voice "timbre"
        "bandwidth": rng.uniform(0.7, 1.5),              # formant sharpness
        "open_quotient": rng.uniform(0.35, 0.75),        # glottal pulse shape -> brightness
        "tilt": rng.uniform(-6, 3),                      # extra dB/octave above 500 Hz
        "breath": rng.uniform(0.0, 0.4),                 # aspiration noise in the source
        "rate": rng.uniform(3.0, 6.0),                   # syllables per second
    }


def demo_utterance(spk, session_gain, rng):
    """A few seconds of syllables in the speaker's voice, through a random channel."""
    n = int(rng.uniform(2.0, 4.0) * DEMO_SR)
    t = np.arange(n) / DEMO_SR
    # Pitch: smooth random intonation with declination, plus cycle-to-cycle jitter.
    knots = np.arange(0, t[-1] + 0.25, 0.25)
    contour = np.interp(t, knots, rng.normal(0, 0.08, len(knots))) - 0.05 * t
    f0 = spk["f0"] * np.exp(contour) * (1 + 0.02 * rng.standard_normal(n))
    # Glottal source: one raised-sine flow pulse per period, differentiated (lip radiation).
    frac = np.cumsum(f0 / DEMO_SR) % 1.0
    oq = spk["open_quotient"]
    source = np.diff(np.where(frac < oq, np.sin(np.pi * frac / oq) ** 2, 0.0), prepend=0.0)
    source += spk["breath"] * source.std() * rng.standard_normal(n)
    source = spectral_filter(source, lambda f: (np.maximum(f, 500) / 500) ** (spk["tilt"] / 6.02))

    out = np.zeros(n)
    pos = int(rng.uniform(0.05, 0.2) * DEMO_SR)          # leading silence
    while pos < n - 0.15 * DEMO_SR:
        length = min(int(DEMO_SR / spk["rate"] * rng.uniform(0.7, 1.3)), n - pos)
        burst = int(length * rng.uniform(0.15, 0.35))
        # Consonant-like noise burst, centred on a speaker-scaled frication frequency.
        centre = rng.choice([2500.0, 3500.0, 5000.0]) * spk["vtl"]
        noise = spectral_filter(rng.standard_normal(burst), lambda f: np.exp(-((f - centre) / (0.3 * centre)) ** 2))
        out[pos:pos + burst] += 0.3 * noise * np.hanning(burst)
        # Vowel: the source through the speaker's vocal tract for a random vowel.
        v = rng.integers(len(VOWELS))
        formants = np.append(VOWELS[v] * spk["accent"][v], spk["f4"]) * spk["vtl"]
        bandwidths = np.array([60.0, 90.0, 120.0, 160.0]) * spk["bandwidth"]
        seg = slice(pos + burst, pos + length)
        vowel = spectral_filter(source[seg], resonators(formants, bandwidths))
        out[seg] += rng.uniform(0.5, 1.0) * vowel / (vowel.std() + 1e-9) * np.hanning(len(vowel)) ** 0.3
        pos += length
        if rng.random() < 0.15:                          # an occasional pause
            pos += int(rng.uniform(0.1, 0.3) * DEMO_SR)

    # Channel: the session's microphone and room, a little per-utterance variation, noise, level.
    utt_gain = random_eq(rng, 1.0, rng.uniform(3500, 7800))
    out = spectral_filter(out, lambda f: session_gain(f) * utt_gain(f))
    snr_db = rng.uniform(10, 30)
    out += rng.standard_normal(n) * np.sqrt(np.mean(out ** 2) / 10 ** (snr_db / 10))
    return out / np.abs(out).max() * 10 ** (rng.uniform(-20, -3) / 20)


def make_demo_speaker(root, seed, s):
    """Write one speaker's 3 sessions x 4 utterances; each speaker has its own seeded RNG."""
    rng = np.random.default_rng([seed, s])
    spk = demo_speaker(rng)
    for session in range(3):
        session_gain = random_eq(rng, 2.0, 8000.0)
        folder = Path(root) / f"spk{s:02d}" / f"sess{session}"
        for u in range(4):
            audio = demo_utterance(spk, session_gain, rng)
            wav = io.BytesIO()  # encoded in memory: a full disk is then the file write's OSError (ENOSPC), not
            sf.write(wav, audio, DEMO_SR, subtype="PCM_16", format="WAV")  # soundfile's assert on a short write
            with atomic_write(folder / f"utt{u}.wav", "wb") as f:
                f.write(wav.getvalue())


def make_demo_corpus(root, seed=0):
    """Write 40 synthetic speakers x 3 sessions x 4 utterances to root/<spk>/<session>/<utt>.wav."""
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # numpy's FFTs release the GIL
        list(pool.map(lambda s: make_demo_speaker(root, seed, s), range(40)))
