"""What prepare_voxceleb.py wrote, read back, and audio fed to the models.

A data folder holds utterances.csv (id, path, speaker, duration, sample_rate, split) and
trials/<list>.txt (`label enroll test`, enroll and test being utterance ids of the manifest).
Paths in the manifest are relative to the data folder when the audio lives inside it, absolute
otherwise, and are resolved here: the folder can be moved and read from any directory.

Training batches follow `data.crop`:
- superb (s3prl's SUPERB recipe): whole utterances, those longer than max_secs randomly cropped
  to max_secs, utterances of at most min_secs dropped; batches are padded.
- fixed: one crop length per batch drawn from [min_secs, max_secs], every utterance cut to it
  and short ones tiled, so batches carry no padding.
With `data.effects=superb` every training file goes through SUPERB's SoX chain (gain -3 dB,
silence removal: asv/audio.py) and the lengths that matter are those after it. What the chain
keeps of a file depends on the file only, so it is computed once per data folder (trim_once:
effects.tsv beside the manifest, the kept sample intervals of each training file) and a training
example decodes only the span of the file its crop needs (audio.trimmed_span), sample for sample
what the whole-file chain gives.
Every random choice (order, crop length, offset) is a pure function of (seed, epoch,
position), so a resumed run sees exactly the batches an uninterrupted run would.

With `data.shards` the files' bytes come from a shard store (prepare_voxceleb.py --shards: tar shards
that wids reads by index) and go through the same readers, so the examples are the same; the sampler
stays the definition of an epoch, and each process reads its own batches' samples only (ShardStore).

Evaluation batches are whole utterances sorted by length and packed up to a budget of audio
seconds, so padding stays small and memory is bounded by the budget.
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import itertools
import math
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .audio import AUDIO_EXTENSIONS, AudioError, header_frames, load_audio, progress
from .audio import SUPERB_GAIN_DB, superb_effects, superb_intervals, trimmed_span
from .augment import Augmenter


# ---------------------------------------------------------------------------- manifests

@dataclass
class Utterance:
    id: str
    path: str  # absolute
    speaker: str
    duration: float
    sample_rate: int
    split: str


def stored_path(path: str, data_dir) -> str:
    """How a manifest stores `path`: relative to the data folder when inside it, else absolute."""
    path, base = os.path.abspath(path), os.path.abspath(data_dir)
    return os.path.relpath(path, base) if Path(path).is_relative_to(base) else path


def read_manifest(data_dir) -> list[Utterance]:
    path = Path(data_dir) / "utterances.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; run prepare_voxceleb.py --out {data_dir} first")
    base = Path(data_dir).resolve()
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    try:
        return [Utterance(r["id"], str(base / r["path"]), r["speaker"], float(r["duration"]), int(r["sample_rate"]),
                          r["split"]) for r in rows]
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: malformed manifest ({e})") from None


# ---------------------------------------------------------------------------- trial lists

LABELS = {"1": 1, "0": 0, "target": 1, "nontarget": 0}


@dataclass
class Trials:
    labels: np.ndarray  # (N,) int8, 1 = same speaker
    enroll: list[str]
    test: list[str]
    lines: list[int]  # line number of each trial in its file


def read_trials(path) -> Trials:
    """A `label enroll test` file (plain or .gz; label 1/0 or target/nontarget; a UTF-8 BOM is fine).
    Kaldi's `enroll test target|nontarget` lines are read too: a line says which order it uses."""
    opener = gzip.open if str(path).endswith(".gz") else open
    labels, enroll, test, lines = [], [], [], []
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) == 3 and parts[0] not in LABELS and parts[2] in ("target", "nontarget"):
                    parts = [parts[2], parts[0], parts[1]]  # Kaldi's order
                if len(parts) != 3 or parts[0] not in LABELS:
                    raise ValueError(f"{path}:{n}: expected 'label enroll test' with label 1/0 or "
                                     f"target/nontarget, got {line.strip()[:120]!r}")
                labels.append(LABELS[parts[0]])
                enroll.append(parts[1])
                test.append(parts[2])
                lines.append(n)
    except FileNotFoundError:
        raise ValueError(f"{path}: trial list not found") from None
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise ValueError(f"{path}: unreadable trial list ({e})") from None
    if not labels:
        raise ValueError(f"{path}: empty trial list")
    return Trials(np.asarray(labels, dtype=np.int8), enroll, test, lines)


def trial_lists(data_dir) -> dict[str, Path]:
    """name -> file for every list in data_dir/trials; 'valid' is the validation list."""
    return {p.stem: p for p in sorted((Path(data_dir) / "trials").glob("*.txt"))}


# ---------------------------------------------------------------------------- lists of audio files

def read_audio_list(source: str) -> tuple[list[str], list[str]]:
    """--extract's input -> (ids, paths), checked before any model work.

    A folder: every audio file under it (AUDIO_EXTENSIONS), id = the path relative to the folder (spk/session/utt.wav).
    A Kaldi data folder (one holding wav.scp) or a .scp file: its utterance ids and files (read_wav_scp).
    A text file: one `path` or `utt_id path` per line, relative paths from the current directory;
    default id = the path relative to the folder all the files share (VoxCeleb style).
    """
    src = Path(source)
    if src.suffix == ".scp" or (src / "wav.scp").is_file():
        return read_kaldi_folder(src) if src.is_dir() else read_wav_scp(src)
    if src.is_dir():
        paths = sorted(str(p) for p in src.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
        if not paths:
            raise ValueError(f"{source}: no {', '.join(AUDIO_EXTENSIONS)} files under this folder")
        return [os.path.relpath(p, src) for p in paths], paths
    if not src.is_file():
        raise ValueError(f"{source}: no such list file or folder")
    given, paths = [], []
    with open(src, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) > 2:
                raise ValueError(f"{source}:{n}: expected 'path' or 'utt_id path', got {line.strip()!r}")
            given.append(parts[0] if len(parts) == 2 else None)
            paths.append(parts[-1])
    if not paths:
        raise ValueError(f"{source}: empty list")
    for p in paths:
        if not os.path.isfile(p):
            raise ValueError(f"{source}: names a missing audio file {p}")
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    ids = [i or os.path.relpath(os.path.abspath(p), root) for i, p in zip(given, paths)]
    if len(set(ids)) < len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{source}: utterance id {dup} appears more than once")
    return ids, paths


# ---------------------------------------------------------------------------- Kaldi data folders

def _kaldi_lines(path):
    """(line number, fields) of each non-blank line of a Kaldi text file."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({' '.join(str(e).split())})") from None
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.split()]


def read_wav_scp(path) -> tuple[list[str], list[str]]:
    """A Kaldi wav.scp -> (utterance ids, audio files): `utt_id path` lines, relative paths from the current
    directory (Kaldi's recipe folder). Commands (`utt_id cmd args |`) are refused: only files are read."""
    ids, paths, first = [], [], {}
    for n, parts in _kaldi_lines(path):
        if parts[-1].endswith("|"):
            raise ValueError(f"{path}:{n}: {parts[0]} is a command ({' '.join(parts[1:])[:80]}), not a file: "
                             "only audio files are read; write its output to a file and name that")
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected 'utt_id path' (a path without spaces), "
                             f"got {' '.join(parts)[:120]!r}")
        utt, audio = parts
        if utt in first:
            raise ValueError(f"{path}:{n}: utterance id {utt} appears twice (first on line {first[utt]})")
        if not os.path.isfile(audio):
            raise ValueError(f"{path}:{n}: {utt}: no such audio file {audio}")
        first[utt] = n
        ids.append(utt)
        paths.append(audio)
    if not ids:
        raise ValueError(f"{path}: empty wav.scp")
    return ids, paths


def read_kaldi_folder(folder) -> tuple[list[str], list[str]]:
    """A Kaldi data folder's wav.scp (see read_wav_scp). A folder with `segments` cuts utterances out of the
    recordings wav.scp names: refused, since its ids are not the folder's utterances."""
    if (Path(folder) / "segments").is_file():
        raise ValueError(f"{Path(folder) / 'segments'}: utterances cut out of recordings are not read; "
                         "write each segment to its own file (e.g. Kaldi's extract-segments)")
    return read_wav_scp(Path(folder) / "wav.scp")


def read_utt2spk(path, ids: list[str]) -> dict[str, str]:
    """A Kaldi utt2spk (`utt_id speaker` lines) -> {utterance id: speaker}, for exactly the utterances `ids`
    of the folder's wav.scp."""
    known, speaker, first = set(ids), {}, {}
    for n, parts in _kaldi_lines(path):
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected 'utt_id speaker', got {' '.join(parts)[:120]!r}")
        utt, spk = parts
        if utt in first:
            raise ValueError(f"{path}:{n}: utterance id {utt} appears twice (first on line {first[utt]})")
        if utt not in known:
            raise ValueError(f"{path}:{n}: {utt} is not an utterance of wav.scp")
        first[utt] = n
        speaker[utt] = spk
    missing = [u for u in ids if u not in speaker]
    if missing:
        raise ValueError(f"{path}: no speaker for {len(missing)} utterance(s) of wav.scp (e.g. {missing[0]})")
    return speaker


# ---------------------------------------------------------------------------- training

SPEED_CLASS = {1.0: 0, 0.9: 1, 1.1: 2}  # speed-perturbed copies of a speaker are new classes


class TrainBatchSampler:
    """Yields batches of (utterance index, crop secs, item seed); see the module docstring.

    Endless; each epoch is a seeded permutation. `fixed` crops group neighbouring utterances by
    length (buckets of 100 batches) so short files are rarely tiled much; `superb` batches are
    plain random draws, as s3prl's. The number of batches is a multiple of `multiple` (gradient
    accumulation x processes), so every epoch ends on an optimizer step and a resume never splits one.
    """

    def __init__(self, durations, batch_size, crop, min_secs, max_secs, seed, multiple=1):
        self.durations = np.asarray(durations, dtype=np.float64)
        self.batch_size, self.crop, self.min_secs, self.max_secs = batch_size, crop, min_secs, max_secs
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
        if self.crop == "fixed":
            bucket = self.batch_size * 100
            for i in range(0, len(order), bucket):  # sort inside buckets so a batch holds similar lengths
                chunk = order[i:i + bucket]
                order[i:i + bucket] = chunk[np.argsort(self.durations[chunk], kind="stable")]
        batches = order.reshape(len(self), self.batch_size)
        if self.crop == "fixed":
            batches = batches[rng.permutation(len(batches))]
            crop_secs = rng.uniform(self.min_secs, self.max_secs, size=len(batches))
        else:
            crop_secs = np.full(len(batches), self.max_secs)
        item_seeds = rng.integers(0, 2**31, size=batches.shape)
        for b, secs, seeds in zip(batches, crop_secs, item_seeds):
            yield [(int(i), float(secs), int(s)) for i, s in zip(b, seeds)]


def example_samples(available: int, secs: float, sample_rate: int, crop: str) -> int:
    """Samples a training example takes from an utterance of `available` samples (after the effects) when
    its batch's crop is `secs`: superb: the whole utterance, cut to `secs` when longer (s3prl's RandomCrop);
    fixed: exactly `secs`, a shorter utterance tiled."""
    need = int(round(secs * sample_rate))
    return min(available, need) if crop == "superb" else need


class TrainDataset(torch.utils.data.Dataset):
    """(index, crop secs, seed) -> (waveform (T,), speaker label).

    With an `augment.Augmenter`: speed perturbation (0.9 / 1.1 count as new speakers:
    label + num_speakers or + 2 x num_speakers), then reverberation and additive noise,
    all drawn from the item's own seed.
    `trims` (effects superb: Trims of `utts`, from trim_once): only the span of the file the crop
    needs is decoded; without them the whole file goes through the effects (the same samples).
    `store` (a ShardStore): the files' bytes come from it, decoded by the same readers.
    """

    def __init__(self, utts: list[Utterance], labels: list[int], sample_rate: int, crop: str, effects: str,
                 augmenter=None, trims: Trims | None = None, store: ShardStore | None = None):
        self.utts, self.labels, self.sample_rate, self.augmenter = utts, labels, sample_rate, augmenter
        self.crop, self.effects, self.trims, self.store = crop, effects, trims, store
        self.num_speakers = max(labels, default=-1) + 1
        if trims is not None and len(trims) != len(utts):
            raise ValueError(f"{len(trims)} trims for {len(utts)} utterances")

    def __len__(self):
        return len(self.utts)

    def __getitem__(self, item):
        index, secs, seed = item
        utt = self.utts[index]
        source = self.store.open(utt.path) if self.store else utt.path  # the file, or its bytes from the store
        rng = np.random.default_rng(seed)
        factor = self.augmenter.speed_factor(rng) if self.augmenter else 1.0
        if self.effects == "none" and self.crop == "fixed":  # only the crop is decoded
            start = rng.uniform(0.0, max(utt.duration - secs * factor, 0.0))
            wav = load_audio(source, self.sample_rate, start, secs * factor)
        elif self.trims is not None or (self.effects == "none" and utt.sample_rate == self.sample_rate):
            # what the effects keep is known (effects.tsv, or all of a file at the model's rate):
            # the crop is drawn as below, and only its span of the file is decoded
            if self.trims is not None:
                db, intervals = self.trims[index]
            else:
                db, intervals = None, np.array([[0, header_frames(source)[0]]])
            available = int((intervals[:, 1] - intervals[:, 0]).sum())
            if available == 0:
                raise AudioError(f"{utt.path}: nothing left after SUPERB's silence trimming")
            keep = example_samples(available, secs * factor, self.sample_rate, "superb")
            start = int(rng.integers(0, available - keep + 1)) if keep < available else 0
            wav = trimmed_span(source, self.sample_rate, intervals, db, start, start + keep)
        else:  # the effects see the whole file, as SoX does in s3prl
            wav = load_audio(source, self.sample_rate)
            if self.effects == "superb":
                wav = superb_effects(wav, self.sample_rate)
                if wav.numel() == 0:
                    raise AudioError(f"{utt.path}: nothing left after SUPERB's silence trimming")
            keep = example_samples(wav.numel(), secs * factor, self.sample_rate, "superb")  # at most the crop
            if keep < wav.numel():
                start = int(rng.integers(0, wav.numel() - keep + 1))
                wav = wav[start:start + keep]
        if factor != 1.0:
            wav = self.augmenter.speed(wav, factor)
        if self.crop == "fixed":  # shorter than the crop: repeat it (no padding inside the batch)
            need = example_samples(wav.numel(), secs, self.sample_rate, "fixed")
            wav = wav.repeat(math.ceil(need / wav.numel()))[:need]
        if self.augmenter:
            wav = self.augmenter(wav, rng)
        return wav, self.labels[index] + SPEED_CLASS[factor] * self.num_speakers


# ---------------------------------------------------------------------------- effects, once per data folder

EFFECTS_FILE = "effects.tsv"  # beside utterances.csv
EFFECTS_PARTS = "effects.parts"  # chunks of an unfinished pass, merged into effects.tsv at its end
EFFECTS_COLUMNS = "path\tsize\tmtime_ns\tsamples\tgain_db\tkept\tintervals"
EFFECTS_CHUNK = 200  # files per saved chunk: a kill loses at most this much work per worker


def effects_params(sample_rate: int) -> str:
    """The header line that says which effects a table holds: another line, another table."""
    return f"# effects=superb gain_db={SUPERB_GAIN_DB:g} silence=1,0.1,0.1%,-1,0.1,0.1% sample_rate={sample_rate}"


def file_key(path: str) -> str:
    """size and modification time: a file rewritten since its row was computed no longer matches it."""
    st = os.stat(path)
    return f"{st.st_size}\t{st.st_mtime_ns}"


def effects_row(path: str, stored: str, sample_rate: int) -> str:
    """One effects.tsv line for a file: its key, its length at sample_rate, the gain, the samples kept and
    the kept [start, end) intervals (`start:end` comma-separated, `-` for none); or `!reason`."""
    try:
        key = file_key(path)  # before decoding: a file rewritten meanwhile no longer matches the row
        wav = load_audio(path, sample_rate)
        intervals = superb_intervals(wav, sample_rate)
    except (AudioError, OSError) as e:
        return f"!{e}"
    kept = int((intervals[:, 1] - intervals[:, 0]).sum())
    spans = ",".join(f"{s}:{e}" for s, e in intervals) or "-"
    return f"{stored}\t{key}\t{wav.numel()}\t{SUPERB_GAIN_DB:g}\t{kept}\t{spans}"


class _EffectChunks(torch.utils.data.Dataset):
    def __init__(self, chunks, sample_rate):
        self.chunks, self.sample_rate = chunks, sample_rate

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, i):
        return [effects_row(path, stored, self.sample_rate) for path, stored in self.chunks[i]]


def _table_rows(path: Path, params: str) -> dict[str, str]:
    """stored path -> line of an effects table or chunk written with `params` (another header: nothing)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return {}
    if not lines or lines[0] != params:
        return {}
    return {line.split("\t", 1)[0]: line for line in lines if line and not line.startswith(("#", "path\t"))}


def read_effects(data_dir, utts: list[Utterance], sample_rate: int,
                 keys: dict[str, str] | None = None) -> tuple[dict[str, str], list[Utterance]]:
    """({stored path: effects.tsv line} for the utterances effects.tsv and any saved chunks cover with their
    current size and mtime, the utterances still to compute). `keys` (ShardStore.keys): the size and mtime of
    the files a shard store was written from, in the place of the files themselves."""
    params = effects_params(sample_rate)
    rows = _table_rows(Path(data_dir) / EFFECTS_FILE, params)
    for part in sorted((Path(data_dir) / EFFECTS_PARTS).glob("*.tsv")):
        rows.update(_table_rows(part, params))
    known, missing = {}, []
    for u in utts:
        stored = stored_path(u.path, data_dir)
        line = rows.get(stored)
        try:
            current = file_key(u.path) if keys is None else keys[stored]
        except OSError as e:
            raise AudioError(f"{u.path}: {e.strerror or e}") from None
        if line is not None and line.split("\t", 3)[1:3] == current.split("\t"):
            known[stored] = line
        else:
            missing.append(u)
    return known, missing


def compute_effects(data_dir, utts: list[Utterance], sample_rate: int, workers: int, tag: str = "main",
                    show_progress: bool = True) -> dict[str, str]:
    """effects.tsv lines of `utts` in `workers` processes, each chunk saved in effects.parts/ as soon as it is
    done (a killed pass resumes from them). A file that cannot be read stops the pass with one line naming
    it, after the chunks done are saved."""
    from .run import write_text  # here, not at the top: asv.run imports this module
    params, parts = effects_params(sample_rate), Path(data_dir) / EFFECTS_PARTS
    items = [(u.path, stored_path(u.path, data_dir)) for u in utts]
    chunks = [items[i:i + EFFECTS_CHUNK] for i in range(0, len(items), EFFECTS_CHUNK)]
    loader = torch.utils.data.DataLoader(_EffectChunks(chunks, sample_rate), batch_size=None,
                                         num_workers=loader_workers(workers))
    bar = progress(total=len(items), desc="trimming silence (once per data folder)", unit="file",
                   enabled=show_progress)
    rows = {}
    for n, lines in enumerate(loader):
        good = [line for line in lines if not line.startswith("!")]
        write_text(parts / f"{tag}-{os.getpid()}-{n:06d}.tsv", "\n".join([params, *good, ""]))
        rows.update((line.split("\t", 1)[0], line) for line in good)
        bar.update(len(lines))
        if len(good) < len(lines):
            raise AudioError(next(line for line in lines if line.startswith("!"))[1:])
    bar.close()
    return rows


def write_effects(data_dir, rows: dict[str, str], sample_rate: int):
    """effects.tsv (atomically) from every row, then the saved chunks go. Its header names the effects and
    the corpus fingerprint (a hash of every path, size and mtime it covers)."""
    from .run import write_text
    lines = [rows[k] for k in sorted(rows)]
    keys = "".join("\t".join(line.split("\t", 3)[:3]) + "\n" for line in lines)  # path, size, mtime_ns
    fingerprint = hashlib.sha256(keys.encode()).hexdigest()[:16]
    note = f"# {len(lines)} files, corpus fingerprint {fingerprint} (sha256 of path, size, mtime_ns)"
    write_text(Path(data_dir) / EFFECTS_FILE, "\n".join([effects_params(sample_rate), note, EFFECTS_COLUMNS, *lines, ""]))
    parts = Path(data_dir) / EFFECTS_PARTS
    if parts.exists():
        for part in parts.iterdir():
            part.unlink()
        parts.rmdir()


class Trims:
    """The effects of a list of files (effects.tsv lines), in flat arrays: a million files are a few arrays,
    not a million objects for every loader worker to copy. trims[i] -> (gain dB, intervals (K, 2))."""

    def __init__(self, lines: list[str]):
        fields = [line.split("\t") for line in lines]
        self.gain = np.array([float(f[4]) for f in fields], dtype=np.float64)
        self.kept = np.array([int(f[5]) for f in fields], dtype=np.int64)  # samples after the effects
        spans = [[] if f[6] == "-" else [tuple(map(int, p.split(":"))) for p in f[6].split(",")] for f in fields]
        self.bounds = np.cumsum([0] + [len(s) for s in spans])
        self.intervals = np.array([p for s in spans for p in s], dtype=np.int64).reshape(-1, 2)

    def __len__(self):
        return len(self.kept)

    def __getitem__(self, i):
        return float(self.gain[i]), self.intervals[self.bounds[i]:self.bounds[i + 1]]

    def take(self, indices) -> Trims:
        """The trims of files `indices`, in that order."""
        out = Trims([])
        pieces = [self.intervals[self.bounds[i]:self.bounds[i + 1]] for i in indices]
        out.gain, out.kept = self.gain[indices], self.kept[indices]
        out.bounds = np.cumsum([0] + [len(p) for p in pieces])
        out.intervals = np.concatenate([out.intervals, *pieces])
        return out


def trims_of(data_dir, utts: list[Utterance], rows: dict[str, str]) -> Trims:
    return Trims([rows[stored_path(u.path, data_dir)] for u in utts])


def trim_once(data_dir, utts: list[Utterance], sample_rate: int, workers: int, show_progress: bool = True) -> Trims:
    """The effects of `utts` from effects.tsv, computing (in `workers` processes) only the files it lacks or
    that changed since (other size or mtime), and rewriting it then. One process; train_asv.py splits the
    work across its processes with read_effects / compute_effects / write_effects."""
    rows, missing = read_effects(data_dir, utts, sample_rate)
    if missing:
        rows.update(compute_effects(data_dir, missing, sample_rate, workers, show_progress=show_progress))
    if missing or (Path(data_dir) / EFFECTS_PARTS).exists():  # a pass was resumed or redone
        write_effects(data_dir, rows, sample_rate)
    return trims_of(data_dir, utts, rows)


AUTO_WORKERS_CAP = 8  # so a 128-core node does not start 100+ workers per process, each with its copy of the dataset


def loader_workers(requested: int) -> int:
    """`num_workers` as the loaders use it: a count as given; -1 the CPUs this process may use (its affinity,
    which taskset, cgroups' cpusets and SLURM narrow; os.cpu_count() counts the whole machine) shared by the
    processes of this node (LOCAL_WORLD_SIZE, set by torchrun and accelerate launch), less one for the
    process's own main loop, at most AUTO_WORKERS_CAP: 1 on 2 cores, 0 with 2 processes on 2 cores."""
    if requested >= 0:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(AUTO_WORKERS_CAP, per_process - 1))


def train_loader(cfg, utts: list[Utterance], labels: list[int], durations: list[float], multiple: int = 1,
                 num_workers: int | None = None, trims: Trims | None = None, store: ShardStore | None = None):
    """The training loader of train_asv.py (and of the benchmarks): the sampler's batches of (utterance,
    crop, seed), SUPERB's effects or none, augmentation when the config asks for it. `multiple`: the
    batches per epoch are a multiple of it (gradient accumulation x processes); `trims`: the files' kept
    intervals from effects.tsv, so an example decodes only its crop's span; `store`: the audio from a shard store."""
    d, a = cfg.data, cfg.augment
    workers = loader_workers(cfg.num_workers if num_workers is None else num_workers)
    sampler = TrainBatchSampler(durations, d.batch_size, d.crop, d.min_secs, d.max_secs, cfg.train.seed,
                                multiple=multiple)
    augmenter = Augmenter(a, d.sample_rate) if a.noise_prob or a.rir_prob or a.speed_prob else None
    dataset = TrainDataset(utts, labels, d.sample_rate, d.crop, d.effects, augmenter, trims, store)
    # pinned batches on CUDA: the prepared loader's non_blocking copy then overlaps the step before
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_padded,
                                       num_workers=workers, persistent_workers=workers > 0,
                                       pin_memory=torch.cuda.is_available())


def collate_padded(items):
    """[(wav (T_i,), tag)] -> wavs (B, T) zero-padded, lengths (B,), tags (B,) (labels or indices)."""
    lengths = torch.tensor([w.numel() for w, _ in items], dtype=torch.long)
    wavs = torch.zeros(len(items), int(lengths.max()))
    for row, (w, _) in enumerate(items):
        wavs[row, : w.numel()] = w
    tags = torch.tensor([t for _, t in items], dtype=torch.long)
    return wavs, lengths, tags


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
    """Whole utterances: index -> (waveform (T,), index). Too-short ones are repeated to `min_samples`.

    `paths` may also hold waveforms (T,) already at `sample_rate` (the API's arrays): they go through
    the same repetition and batching as files, so an array and its file embed the same. `store` (a ShardStore):
    the manifest's files are read from it (others from disk).
    """

    def __init__(self, paths: list[str | torch.Tensor], sample_rate: int, min_samples: int = 0,
                 store: ShardStore | None = None):
        self.paths, self.sample_rate, self.min_samples, self.store = paths, sample_rate, min_samples, store

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        item = self.paths[index]
        if isinstance(item, torch.Tensor):
            wav = item
        else:
            wav = load_audio(self.store.open(item) if self.store else item, self.sample_rate)
        if wav.numel() < self.min_samples:
            wav = wav.repeat(math.ceil(self.min_samples / wav.numel()))[: self.min_samples]
        return wav, index


# ---------------------------------------------------------------------------- shard store

SHARD_INDEX = "shards.json"  # wids' shard index (wids-shard-index-v1) plus our "asv" record; written last
SHARD_FILES = "files.tsv"  # stored path, size, mtime_ns of every sample, in the index's order (the manifest's)
SHARD_NAME = "shard-{:06d}.tar"  # each written as .tmp and renamed when complete


def _wids():
    try:
        import wids
    except ImportError:
        raise ValueError("data.shards needs wids (pip install -e '.[extra]', or pip install wids)") from None
    return wids


def manifest_fingerprint(data_dir) -> str:
    """sha256 of utterances.csv: a store is written from one manifest and read with that one only (its order is
    the store's, its paths name the samples)."""
    return hashlib.sha256((Path(data_dir) / "utterances.csv").read_bytes()).hexdigest()[:16]


def _store_entries(out: Path) -> list[str]:
    """What a store folder holds that is not a store's: refused rather than written over."""
    ours = re.compile(r"^(shard-\d{6}\.tar(\.tmp)?|shard-\d{6}\.tar\.lock|%s|%s)$" % (SHARD_INDEX, SHARD_FILES))
    return [p.name for p in out.iterdir() if not ours.match(p.name)]


def _shard_plan(sizes: list[int], shard_bytes: int) -> list[tuple[int, int]]:
    """[lo, hi) runs of consecutive samples, each filling a shard up to shard_bytes (at least one sample)."""
    plan, lo, used = [], 0, 0
    for i, size in enumerate(sizes):
        need = 512 + -(-size // 512) * 512  # a tar member: its header and its data in 512-byte blocks
        if i > lo and used + need > shard_bytes:
            plan.append((lo, i))
            lo, used = i, 0
        used += need
    if lo < len(sizes):
        plan.append((lo, len(sizes)))
    return plan


def _member(i: int, path: str) -> str:
    """A sample's name in its shard: its position in the manifest (wids' key) and its file's extension."""
    return f"{i:09d}{Path(path).suffix.lower()}"


def _shard_holds(shard: Path, names: list[str], sizes: list[int]) -> bool:
    """Whether a complete shard left by an earlier (killed) write holds exactly these members."""
    with tarfile.open(shard) as tar:
        members = [(m.name, m.size) for m in tar.getmembers()]
    return members == list(zip(names, sizes))


def write_shards(data_dir, out, shard_mb: float = 256, show_progress: bool = True) -> str:
    """Every utterance of a data folder's manifest, its file's bytes as they are, into tar shards of about
    `shard_mb` MB that wids reads by index (random access), with wids' JSON index. Each shard is written under a
    temporary name and renamed; files.tsv and the index come last, so a killed write leaves no index, and a re-run
    keeps the complete shards that already hold what they should. Returns a summary line."""
    from .run import write_json, write_text
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; give a new or empty folder for the shards")
    strangers = _store_entries(out) if out.is_dir() else []
    if strangers:
        raise ValueError(f"{out}: holds {strangers[0]}, not a shard store's file; give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    utts = read_manifest(data_dir)
    keys = []
    for u in utts:
        try:
            keys.append(file_key(u.path).split("\t"))
        except OSError as e:
            raise AudioError(f"{u.path}: {e.strerror or e}") from None
    sizes = [int(size) for size, _ in keys]
    plan = _shard_plan(sizes, int(shard_mb * 1e6))
    bar = progress(total=len(utts), desc="writing shards", unit="file", enabled=show_progress)
    shardlist, kept = [], 0
    for k, (lo, hi) in enumerate(plan):
        final = out / SHARD_NAME.format(k)
        names = [_member(i, utts[i].path) for i in range(lo, hi)]
        if final.is_file() and _shard_holds(final, names, sizes[lo:hi]):
            kept += 1
        else:
            tmp = final.with_name(final.name + ".tmp")
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for i, name in zip(range(lo, hi), names):
                    data = Path(utts[i].path).read_bytes()
                    if len(data) != sizes[i]:
                        raise AudioError(f"{utts[i].path}: changed while the shards were written; run it again")
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            os.replace(tmp, final)
        bar.update(hi - lo)
        shardlist.append({"url": final.name, "nsamples": hi - lo, "filesize": final.stat().st_size})
    bar.close()
    for stale in sorted(out.glob("shard-*.tar*")):  # from an earlier write of more shards, or a killed one
        if stale.name not in {s["url"] for s in shardlist}:
            stale.unlink()
    stored = [stored_path(u.path, data_dir) for u in utts]
    write_text(out / SHARD_FILES, "".join(f"{p}\t{size}\t{mtime}\n" for p, (size, mtime) in zip(stored, keys)))
    write_json(out / SHARD_INDEX, {
        "__kind__": "wids-shard-index-v1", "wids_version": 1, "name": Path(data_dir).resolve().name,
        "shardlist": shardlist,
        "asv": {"manifest": manifest_fingerprint(data_dir), "utterances": len(utts),
                "files": hashlib.sha256((out / SHARD_FILES).read_bytes()).hexdigest()[:16]}})
    total = sum(s["filesize"] for s in shardlist) / 1e6
    again = f" ({kept} kept from an earlier write)" if kept else ""
    return f"{out}: {len(utts)} files in {len(plan)} shards, {total:.1f} MB{again}"


def _is_url(source: str) -> bool:
    return "://" in source or source.startswith("pipe:")


class ShardStore:
    """A shard store (write_shards) read through wids: sample i is utterance i of the manifest, read by index
    (random access), so the sampler's batches stay the definition of an epoch and each process reads the samples
    of its own batches only. A folder is read in place; a URL (what wids downloads: http(s), s3, gs, file) is
    copied shard by shard into wids' cache ($WIDS_CACHE, default /tmp/_wids_cache) when first needed.

    open(path) -> the utterance's file as an io.BytesIO named `path` (the readers of asv.audio take it as they
    take the path), or `path` itself for a file the store does not hold. `reads` counts the samples read per shard
    in this process."""

    def __init__(self, source: str, data_dir):
        self.source = source.rstrip("/")
        self.index = self.source if self.source.endswith(".json") else f"{self.source}/{SHARD_INDEX}"
        self.local = not _is_url(self.source)
        if self.local and not Path(self.index).is_file():
            raise ValueError(f"{self.index}: no shard index; write the store with prepare_voxceleb.py --shards "
                             f"{data_dir} --out {self.source}")
        self.spec = self._load_index()
        found, wrote = manifest_fingerprint(data_dir), self.spec.get("asv", {}).get("manifest")
        if found != wrote:
            raise ValueError(f"{self.index}: written from another manifest (fingerprint {wrote}, {data_dir}/"
                             f"utterances.csv has {found}): write the store again from {data_dir}")
        self.shards = self.spec["shardlist"]
        self.ends = np.cumsum([s["nsamples"] for s in self.shards])
        self.row = {u.path: i for i, u in enumerate(read_manifest(data_dir))}
        if len(self.row) != self.ends[-1]:
            raise ValueError(f"{self.index}: {self.ends[-1]} samples for the {len(self.row)} utterances of {data_dir}")
        if self.local:  # every shard there, at its size: a missing or cut one is named before any work
            for s in self.shards:
                self._check_size(Path(self.index).parent / s["url"], s)
        self.reads = np.zeros(len(self.shards), dtype=np.int64)
        self._dataset = None  # wids' dataset, opened in each process (loader worker) on first use

    def _load_index(self) -> dict:
        wids = _wids()
        try:
            return wids.wids_specs.load_remote_dsdesc_raw(self.index)
        except Exception as e:  # wids' downloader fails with AssertionError, OSError or a JSON error
            raise ValueError(f"{self.index}: unreadable shard index ({one_reason(e)})") from None

    def _check_size(self, path: Path, desc: dict):
        if not path.is_file():
            raise AudioError(f"{path}: shard missing from the store {self.index}")
        if path.stat().st_size != desc["filesize"]:
            raise AudioError(f"{path}: {path.stat().st_size} bytes where {self.index} says {desc['filesize']}: "
                             "a cut or corrupt shard; write the store again (or delete this copy of it)")

    def __getstate__(self):  # a loader worker opens its own wids dataset (open files do not travel)
        return {**self.__dict__, "_dataset": None}

    def keys(self) -> dict[str, str]:
        """stored path -> 'size\\tmtime_ns' of the files the store was written from (effects.tsv's keys)."""
        if self.local:
            text = (Path(self.index).parent / SHARD_FILES).read_text(encoding="utf-8")
        else:
            import tempfile
            with tempfile.TemporaryDirectory() as tmp:
                text = Path(_wids().wids_dl.download_file(self.index.rsplit("/", 1)[0] + "/" + SHARD_FILES,
                                                          f"{tmp}/{SHARD_FILES}")).read_text(encoding="utf-8")
        return dict(line.split("\t", 1) for line in text.splitlines() if line)

    def _open_dataset(self):
        wids = _wids()
        base = str(Path(self.index).parent.resolve()) if self.local else self.index.rsplit("/", 1)[0]
        with contextlib.redirect_stderr(io.StringIO()):  # wids 0.1.11 prints a summary line on every construction
            self._dataset = wids.ShardListDataset(
                [{**s, "url": f"{base}/{s['url']}"} for s in self.shards],
                # in place: wids' cache folder is then the store's own (nothing copied); a URL: wids' cache
                **({"cache_dir": base} if self.local else {}),
                lru_size=min(len(self.shards), 200), transformations=[])  # every shard stays open (mmap)
        self._checked = set()

    def open(self, path):
        """The utterance's file from the store, checked to be the sample the index lists there."""
        i = self.row.get(path)
        if i is None:
            return path
        if self._dataset is None:
            self._open_dataset()
        k = int(np.searchsorted(self.ends, i, side="right"))
        url = self._dataset.shards[k]["url"]
        try:
            tar, inner, desc = self._dataset.get_shard(i)
            if k not in self._checked:
                self._check_size(Path(tar.path), desc)
                if len(tar) != desc["nsamples"]:
                    raise AudioError(f"{url}: {len(tar)} samples where {self.index} says {desc['nsamples']}: a corrupt "
                                     "shard; write the store again")
                self._checked.add(k)
            sample = tar[inner]
        except AudioError:
            raise
        except Exception as e:  # a missing download, a header wids cannot parse
            raise AudioError(f"{url}: unreadable shard ({one_reason(e)})") from None
        files = [v for name, v in sample.items() if not name.startswith("__")]
        if sample["__key__"] != f"{i:09d}" or len(files) != 1:
            raise AudioError(f"{url}: holds {sample['__key__']} where sample {i:09d} was expected: not the shard "
                             f"{self.index} lists; write the store again")
        self.reads[k] += 1
        files[0].name = path
        return files[0]


def one_reason(e: Exception) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def open_store(cfg) -> ShardStore | None:
    """data.shards' store, checked against data.dir; None when the audio is read from the manifest's files."""
    return ShardStore(cfg.data.shards, cfg.data.dir) if cfg.data.shards else None
