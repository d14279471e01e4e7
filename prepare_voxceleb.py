"""Stage 0: a corpus on disk -> plain-text manifests and trial lists.

    python prepare_voxceleb.py --voxceleb1 ROOT --out data/vox1 [--trials FILE ...]
    python prepare_voxceleb.py --voxceleb2 ROOT [--voxceleb1 ROOT] --out data/vox2 [--convert-to DIR]
    python prepare_voxceleb.py --corpus ROOT --out data/mine [--trials FILE ...]
    python prepare_voxceleb.py --demo --out data/demo

Writes, under --out:
    utterances.csv      id,path,speaker,duration,sample_rate,split (one row per usable file)
    speakers.txt        speaker split num_utterances
    trials/<name>.txt   label enroll test (1 = same speaker; absolute paths);
                        valid.txt is for checkpoint selection, every other list is a test list
    skipped.txt         path<TAB>reason for every file (or trial) left out

A corpus is a `speaker/session/utterance.{wav,flac,m4a}` tree. Durations come from file
headers, never from decoding, so preparing VoxCeleb2 (1M files) takes minutes.
VoxCeleb2's AAC .m4a files are read through FFmpeg (PyAV) as they are, or decoded once to
FLAC with --convert-to DIR (lossless, and about twice as fast to read during training).
Trial lists use whitespace as separator, so paths must not contain spaces.
"""
import argparse
import contextlib
import csv
import glob
import gzip
import itertools
import os
import posixpath
import random
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

from data import AUDIO_EXTENSIONS, AudioError, header_frames, load_audio, progress

# Official VoxCeleb1 trial lists (file stem -> list name); "2" = cleaned version.
OFFICIAL_TRIALS = {
    "veri_test": "vox1-O", "veri_test2": "vox1-O-clean",
    "list_test_all": "vox1-E", "list_test_all2": "vox1-E-clean",
    "list_test_hard": "vox1-H", "list_test_hard2": "vox1-H-clean",
}
LABELS = {"1": 1, "0": 0, "target": 1, "nontarget": 0}


# ---------------------------------------------------------------- demo corpus
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
        folder.mkdir(parents=True, exist_ok=True)
        for u in range(4):
            audio = demo_utterance(spk, session_gain, rng)
            tmp = folder / f"utt{u}.wav.tmp"
            sf.write(tmp, audio, DEMO_SR, subtype="PCM_16", format="WAV")
            os.replace(tmp, folder / f"utt{u}.wav")


def make_demo_corpus(root, seed=0):
    """Write 40 synthetic speakers x 3 sessions x 4 utterances to root/<spk>/<session>/<utt>.wav."""
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # numpy's FFTs release the GIL
        list(pool.map(lambda s: make_demo_speaker(root, seed, s), range(40)))


# ---------------------------------------------------------------- corpus scanning
def speaker_of(utt):
    """An id is speaker/session/utterance.ext."""
    return utt.split("/", 1)[0]


def scan_tree(root):
    """{id: path} for every speaker/session/utterance.{wav,flac,m4a} under root (ids use '/')."""
    root = os.path.realpath(root)
    if not os.path.isdir(root):
        raise SystemExit(f"{root}: corpus folder not found")
    if any(c.isspace() for c in root):
        raise SystemExit(f"{root}: corpus path contains whitespace, which trial lists cannot hold")
    found = {}
    for rel in glob.glob(os.path.join("*", "*", "*"), root_dir=root):
        path = os.path.join(root, rel)
        if rel.lower().endswith(AUDIO_EXTENSIONS) and os.path.isfile(path):
            found[rel.replace(os.sep, "/")] = path
    return found


def voxceleb_wav_dirs(root):
    """The wav folders of an official VoxCeleb layout: ROOT/wav, or ROOT/dev/wav + ROOT/test/wav."""
    dirs = [d for d in (Path(root) / "wav", Path(root) / "dev" / "wav", Path(root) / "test" / "wav") if d.is_dir()]
    if not dirs:
        raise SystemExit(f"{root}: no wav/ (or dev/wav/, test/wav/) folder: is this a VoxCeleb root?")
    return dirs


def voxceleb2_dirs(root):
    """The dev set's folder of an official VoxCeleb2 layout: ROOT/dev/aac, ROOT/aac, or ROOT itself
    holding the id0xxxx speaker folders (the test set, ROOT/test/aac, is left out)."""
    for folder in (Path(root) / "dev" / "aac", Path(root) / "aac"):
        if folder.is_dir():
            return [folder]
    if any(p.is_dir() for p in Path(root).glob("id*")):
        return [Path(root)]
    raise SystemExit(f"{root}: no dev/aac/, aac/ or id* speaker folders: is this a VoxCeleb2 root?")


def read_header(path, min_secs):
    """(duration, sample_rate) from the file header, or (None, reason) when it is unusable."""
    if any(c.isspace() for c in path):
        return None, "name contains whitespace (trial lists are space separated)"
    try:
        frames, rate = header_frames(path)
    except Exception as error:  # any bad file is skipped, not fatal
        reason = getattr(error, "error_string", None) or getattr(error, "strerror", None) or error
        return None, f"unreadable: {reason}"
    if frames <= 0:
        return None, "empty: 0 frames"
    duration = frames / rate
    if duration < min_secs:
        return None, f"too short ({duration:.4f} s < {min_secs:g} s)"
    return duration, rate


def read_headers(files, min_secs, workers):
    """Split {id: path} into usable {id: (duration, sample_rate)} and skipped {id: reason}."""
    ids = sorted(files)
    chunks = [ids[i:i + 1000] for i in range(0, len(ids), 1000)]  # not a million futures at once
    with ThreadPoolExecutor(workers) as pool:  # header reads wait on the disk; FFmpeg and libsndfile release the GIL
        results = pool.map(lambda chunk: [read_header(files[i], min_secs) for i in chunk], chunks)
        results = progress(itertools.chain.from_iterable(results), len(ids), "reading headers", "file")
        usable, skipped = {}, {}
        for utt, (duration, rate_or_reason) in zip(ids, results):
            if duration is None:
                skipped[utt] = rate_or_reason
            else:
                usable[utt] = (duration, rate_or_reason)
    return usable, skipped


# ---------------------------------------------------------------- m4a -> flac
def convert_to_flac(task):
    """Decode (src, dst, sample_rate, duration) to a FLAC file at dst; None, or why src is unusable."""
    src, dst, rate, duration = task
    try:
        audio = load_audio(src, rate).numpy()  # at the file's own rate: nothing is resampled
    except AudioError as error:
        return str(error).removeprefix(f"{src}: ")
    if len(audio) < round(duration * rate):  # a cut download: the header promises more than there is
        return f"truncated: {len(audio) / rate:.4f} s of audio, the header says {duration:.4f} s"
    tmp = f"{dst}.tmp"  # renamed once complete, so a killed run leaves no half file that looks done
    try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        sf.write(tmp, audio, rate, subtype="PCM_16", format="FLAC")  # libsndfile clips AAC's overshoots
        os.replace(tmp, dst)
    except (OSError, sf.LibsndfileError) as error:  # a full disk: stop; finished files are kept
        raise SystemExit(f"{dst}: cannot write ({error})") from None
    return None


def convert_m4a(files, usable, out_dir, workers):
    """Decode every usable .m4a to out_dir/speaker/session/utterance.flac in `workers` processes.
    Returns ({id: flac path}, {id: reason} for those that failed). Resumable: a FLAC file that
    exists was completed by an earlier run, so it is not decoded again."""
    flac = {utt: os.path.join(out_dir, os.path.splitext(utt)[0] + ".flac")
            for utt in sorted(usable) if files[utt].lower().endswith(".m4a")}
    todo = [utt for utt in flac if not os.path.exists(flac[utt])]
    tasks = [(files[utt], flac[utt], usable[utt][1], usable[utt][0]) for utt in todo]
    failed = {}
    with ProcessPoolExecutor(workers) as pool:  # decoding is CPU work: processes, not threads
        results = progress(pool.map(convert_to_flac, tasks, chunksize=16), len(tasks), "converting to flac", "file")
        for utt, reason in zip(todo, results):
            if reason is not None:
                failed[utt] = reason
    print(f"converted {len(todo) - len(failed)} m4a files to FLAC in {out_dir} ({len(flac) - len(todo)} "
          f"converted by an earlier run, {len(failed)} failed: see skipped.txt)")
    return {utt: path for utt, path in flac.items() if utt not in failed}, failed


# ---------------------------------------------------------------- trial lists
def trial_list_name(path):
    """vox1-O for veri_test.txt(.gz) and the other official lists, else the file stem."""
    stem = os.path.splitext(os.path.basename(str(path)).removesuffix(".gz"))[0]
    return OFFICIAL_TRIALS.get(stem, stem)


def official_trial_files(root):
    """The official VoxCeleb1-O lists found in root (plain or gzipped). Not E/H: they name all
    1,251 speakers, so a model trained on VoxCeleb1 dev cannot be tested on them fairly; pass
    them with --trials when training on other data (VoxCeleb2)."""
    found = []
    for stem in ("veri_test", "veri_test2"):
        candidates = [Path(root) / f"{stem}.txt", Path(root) / f"{stem}.txt.gz"]
        found += [p for p in candidates if p.is_file()][:1]  # the plain file if both exist
    if not found:
        raise SystemExit(f"{root}: no trial list found (expected e.g. veri_test2.txt); pass --trials FILE")
    return found


def trial_id(path, roots):
    """The corpus id a trial path names (relative to a root, or absolute inside one); None if outside."""
    if os.path.isabs(path):
        for root in roots:
            rel = os.path.relpath(os.path.realpath(path), os.path.realpath(root))
            if rel.split(os.sep)[0] != "..":
                return rel.replace(os.sep, "/")
        return None
    rel = posixpath.normpath(path)
    return None if rel.split("/")[0] == ".." else rel


def read_trials(trial_file, roots, files):
    """[(line_no, label, enroll_id, test_id)] from a `label enroll test` file; exits on a bad line."""
    if not os.path.isfile(trial_file):
        raise SystemExit(f"{trial_file}: trial list not found")
    opener = gzip.open if str(trial_file).endswith(".gz") else open
    trials = []
    with opener(trial_file, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3:
                raise SystemExit(f"{trial_file}:{line_no}: expected 'label enroll test', got {len(fields)} fields")
            if fields[0] not in LABELS:
                raise SystemExit(f"{trial_file}:{line_no}: bad label {fields[0]!r} (use 1/0 or target/nontarget)")
            ids = []
            for path in fields[1:]:
                utt = trial_id(path, roots)
                if utt is None:
                    raise SystemExit(f"{trial_file}:{line_no}: {path} is outside the corpus root")
                if utt not in files:  # not a speaker/session/utterance.{wav,flac} of the corpus
                    where = " or ".join(map(str, roots))
                    raise SystemExit(f"{trial_file}:{line_no}: {path} not found in the corpus under {where}")
                ids.append(utt)
            trials.append((line_no, LABELS[fields[0]], ids[0], ids[1]))
    if not trials:
        raise SystemExit(f"{trial_file}: trial list is empty")
    return trials


def load_trial_lists(trial_files, roots, files, skipped):
    """{name: [(label, enroll_id, test_id)]} without trials naming a skipped file, the speakers
    named (the test speakers, even where their trials were dropped) and the dropped trials."""
    trial_lists, speakers, dropped = {}, set(), []
    for trial_file in trial_files:
        name = trial_list_name(trial_file)
        if name in trial_lists or name == "valid":
            raise SystemExit(f"{trial_file}: list name {name!r} is already taken: rename the file")
        trial_lists[name] = []
        for line_no, label, enroll, test in read_trials(trial_file, roots, files):
            speakers |= {speaker_of(enroll), speaker_of(test)}
            bad = [u for u in (enroll, test) if u in skipped]
            if bad:
                dropped.append((str(trial_file), f"line {line_no} dropped: {bad[0]} was skipped"))
            else:
                trial_lists[name].append((label, enroll, test))
        if not trial_lists[name]:
            raise SystemExit(f"{trial_file}: every trial names a skipped file")
    return trial_lists, speakers, dropped


def sample_pairs(rng, n, total, draw, all_pairs):
    """n distinct unordered pairs out of `total`: enumerate them when few, else draw and dedupe."""
    if total <= 2 * n:  # drawing would keep hitting pairs it already has
        return rng.sample(sorted(all_pairs()), n)
    seen = set()
    while len(seen) < n:
        seen.add(tuple(sorted(draw())))
    return sorted(seen)  # sets have no reproducible order


def balanced_trials(by_speaker, max_trials, rng):
    """Same-speaker pairs (at most max_trials/2) and as many different-speaker pairs, shuffled."""
    speakers = sorted(by_speaker)
    sizes = [len(by_speaker[s]) for s in speakers]
    n_target = sum(k * (k - 1) // 2 for k in sizes)
    n_nontarget = (sum(sizes) ** 2 - sum(k * k for k in sizes)) // 2
    n = min(n_target, n_nontarget, max_trials // 2)
    flat = [(s, u) for s in speakers for u in by_speaker[s]]
    weights = [k * (k - 1) // 2 for k in sizes]  # pick a speaker in proportion to its pairs

    def draw_target():
        return rng.sample(by_speaker[rng.choices(speakers, weights)[0]], 2)

    def draw_nontarget():
        while True:
            (s1, u1), (s2, u2) = rng.sample(flat, 2)
            if s1 != s2:
                return u1, u2

    def all_targets():
        return [p for s in speakers for p in itertools.combinations(by_speaker[s], 2)]

    def all_nontargets():
        return [(u1, u2) for (s1, u1), (s2, u2) in itertools.combinations(flat, 2) if s1 != s2]

    trials = [(1, *p) for p in sample_pairs(rng, n, n_target, draw_target, all_targets)]
    trials += [(0, *p) for p in sample_pairs(rng, n, n_nontarget, draw_nontarget, all_nontargets)]
    rng.shuffle(trials)
    return trials


# ---------------------------------------------------------------- splits and output
def choose_speakers(by_speaker, candidates, count, what, rng):
    """A seeded choice of `count` speakers among candidates with >= 2 usable utterances."""
    eligible = sorted(s for s in candidates if len(by_speaker[s]) >= 2)
    if len(eligible) < count:
        raise SystemExit(f"need {count} {what} speakers with >= 2 usable utterances, "
                         f"found {len(eligible)}: lower --{what}-speakers or add data")
    return set(rng.sample(eligible, count))


@contextlib.contextmanager
def atomic_open(path):
    """Open path.tmp for writing, renamed to path only once it is complete."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        yield f
    os.replace(tmp, path)


def write_outputs(out, usable, files, speaker_split, trial_lists, skipped_lines):
    """utterances.csv, speakers.txt, trials/*.txt and skipped.txt; stale trial lists removed."""
    (out / "trials").mkdir(parents=True, exist_ok=True)
    with atomic_open(out / "utterances.csv") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "path", "speaker", "duration", "sample_rate", "split"])
        for utt in sorted(usable):
            duration, rate = usable[utt]
            speaker = speaker_of(utt)
            writer.writerow([utt, files[utt], speaker, f"{duration:.4f}", rate, speaker_split[speaker]])
    counts = Counter(speaker_of(utt) for utt in usable)
    with atomic_open(out / "speakers.txt") as f:
        f.writelines(f"{s} {speaker_split[s]} {counts[s]}\n" for s in sorted(counts))
    for name, trials in trial_lists.items():
        with atomic_open(out / "trials" / f"{name}.txt") as f:
            f.writelines(f"{label} {files[e]} {files[t]}\n" for label, e, t in trials)
    for old in (out / "trials").glob("*.txt"):
        if old.stem not in trial_lists:  # left over from an earlier run
            old.unlink()
    with atomic_open(out / "skipped.txt") as f:
        f.writelines(f"{path}\t{reason}\n" for path, reason in skipped_lines)


def auto_or_count(text):
    """argparse type: 'auto' or a speaker count >= 2 (fewer cannot make non-target trials)."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number >= 2, got {text!r}")
    return int(text)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--voxceleb1", metavar="ROOT", help="VoxCeleb1 root: ROOT/wav or ROOT/{dev,test}/wav")
    source.add_argument("--corpus", metavar="ROOT", help="any speaker/session/utterance.{wav,flac,m4a} tree")
    source.add_argument("--demo", action="store_true", help="generate a small synthetic corpus in OUT/corpus")
    parser.add_argument("--voxceleb2", metavar="ROOT",
                        help="VoxCeleb2 dev set for training: ROOT/dev/aac, ROOT/aac or ROOT holding the id* "
                             "speaker folders (.m4a). With --voxceleb1, VoxCeleb1 dev joins training and VoxCeleb1's "
                             "trial lists test; alone, test and valid speakers are held out as with --corpus")
    parser.add_argument("--convert-to", metavar="DIR",
                        help="decode every .m4a once to DIR/speaker/session/utterance.flac (lossless; training "
                             "then reads FLAC, about twice as fast as AAC) in --workers processes, with the "
                             "manifest pointing at the FLAC files. Resumable: re-run the same command after an "
                             "interruption and only the missing files are decoded")
    parser.add_argument("--out", metavar="DIR", required=True, type=Path, help="output folder")
    parser.add_argument("--trials", nargs="+", metavar="FILE",
                        help="trial lists 'label enroll test' (paths relative to the corpus root); "
                             "their speakers are held out as test. VoxCeleb1: official lists in ROOT")
    parser.add_argument("--test-speakers", metavar="N", type=auto_or_count, default="auto",
                        help="without --trials: speakers held out for a generated 'test' list "
                             "(auto = max(2, 10%% of speakers); --demo: 8)")
    parser.add_argument("--valid-speakers", metavar="N", type=auto_or_count, default="auto",
                        help="training speakers held out for the 'valid' list "
                             "(auto = max(2, 3%% of non-test speakers); --demo: 4)")
    parser.add_argument("--min-secs", metavar="SECS", type=float, default=0.3, help="skip shorter files")
    parser.add_argument("--max-trials", metavar="N", type=int, default=20000, help="cap on each generated trial list")
    parser.add_argument("--seed", type=int, default=0, help="seed for speaker choice, trials and demo")
    parser.add_argument("--workers", metavar="N", type=int, default=8,
                        help="threads reading file headers; processes for --convert-to (at most the CPU count)")
    args = parser.parse_args(argv)
    if not (args.voxceleb1 or args.voxceleb2 or args.corpus or args.demo):
        parser.error("one of --voxceleb1, --voxceleb2, --corpus or --demo is required")
    if args.voxceleb2 and (args.corpus or args.demo):
        parser.error("--voxceleb2 combines with --voxceleb1 only")
    if (args.trials or args.voxceleb1) and args.test_speakers != "auto":
        parser.error("--test-speakers applies only without trial lists (they name the test speakers)")
    if args.max_trials < 2 or args.workers < 1 or args.min_secs < 0:
        parser.error("--max-trials must be >= 2, --workers >= 1 and --min-secs >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = args.out.resolve()
    rng = random.Random(args.seed)
    if args.demo:
        make_demo_corpus(out / "corpus", seed=args.seed)
        roots = [out / "corpus"]
    elif args.corpus:
        roots = [Path(args.corpus)]
    else:  # VoxCeleb1, VoxCeleb2 or both: their speaker ids (id1xxxx, id0xxxx) never collide
        roots = voxceleb_wav_dirs(args.voxceleb1) if args.voxceleb1 else []
        roots += voxceleb2_dirs(args.voxceleb2) if args.voxceleb2 else []
    convert_dir = args.convert_to and os.path.realpath(args.convert_to)
    if convert_dir and any(Path(convert_dir).is_relative_to(os.path.realpath(root)) for root in roots):
        raise SystemExit(f"{convert_dir}: --convert-to must be outside the corpus (a re-run would find both copies)")
    if convert_dir and any(c.isspace() for c in convert_dir):
        raise SystemExit(f"{convert_dir}: --convert-to path contains whitespace, which trial lists cannot hold")
    files = {}
    for root in roots:
        for utt, path in scan_tree(root).items():
            if utt in files:
                raise SystemExit(f"{path}: same id {utt} as {files[utt]}")
            files[utt] = path
    if not files:
        raise SystemExit(f"{roots[0]}: no speaker/session/utterance.wav, .flac or .m4a files found")
    trial_files = args.trials or (official_trial_files(args.voxceleb1) if args.voxceleb1 else [])

    usable, skipped = read_headers(files, args.min_secs, args.workers)
    if convert_dir:
        flac, failed = convert_m4a(files, usable, convert_dir, min(args.workers, os.cpu_count()))
        files.update(flac)  # ids stay the corpus's (.m4a), so trial lists naming them still resolve
        for utt, reason in failed.items():
            del usable[utt]
            skipped[utt] = reason
    by_speaker = defaultdict(list)
    for utt in sorted(usable):
        by_speaker[speaker_of(utt)].append(utt)

    # Test speakers: those the trial lists name, else a seeded held-out set.
    trial_lists, test_speakers, dropped = load_trial_lists(trial_files, roots, files, skipped)
    if not trial_files:
        count = args.test_speakers
        if count == "auto":  # the demo keeps more speakers out, so its EER rests on more trials
            count = 8 if args.demo else max(2, round(0.1 * len(by_speaker)))
        test_speakers = choose_speakers(by_speaker, by_speaker, count, "test", rng)
    # Validation speakers come out of training, so checkpoint selection never sees test trials.
    train_pool = [s for s in sorted(by_speaker) if s not in test_speakers]
    count = args.valid_speakers
    if count == "auto":
        count = 4 if args.demo else max(2, round(0.03 * len(train_pool)))
    if len(train_pool) - count < 2:
        hint = " (VoxCeleb1-E/H name every speaker: pass --trials veri_test2.txt)" if args.voxceleb1 else ""
        raise SystemExit(f"{len(test_speakers)} of {len(by_speaker)} speakers are test speakers: too few left "
                         f"for {count} valid and >= 2 training speakers{hint}")
    valid_speakers = choose_speakers(by_speaker, train_pool, count, "valid", rng)
    if not trial_files:
        trial_lists["test"] = balanced_trials({s: by_speaker[s] for s in test_speakers}, args.max_trials, rng)
    trial_lists["valid"] = balanced_trials({s: by_speaker[s] for s in valid_speakers}, args.max_trials, rng)

    split = {s: "test" if s in test_speakers else "valid" if s in valid_speakers else "train" for s in by_speaker}
    skipped_lines = [(files[utt], reason) for utt, reason in sorted(skipped.items())] + dropped
    write_outputs(out, usable, files, split, trial_lists, skipped_lines)
    for name, trials in trial_lists.items():
        print(f"trials/{name}.txt: {len(trials)} trials ({sum(t[0] for t in trials)} target)")
    per_split = Counter(split[speaker_of(utt)] for utt in usable)
    dropped_note = f"; dropped {len(dropped)} trials naming skipped files" if dropped else ""
    print(f"prepared {len(usable)} utterances of {len(by_speaker)} speakers (train {per_split['train']} / "
          f"valid {per_split['valid']} / test {per_split['test']}); skipped {len(skipped)} files"
          f"{dropped_note} (see {out / 'skipped.txt'})")


if __name__ == "__main__":
    main()
