"""A small Python API over a trained checkpoint: embed, score, enroll, verify, identify.

A notebook cell, after README's first line (the demo corpus in data/demo, a run in exp/demo);
tests/test_api.py runs exactly this example::

    import asv
    from asv.audio import load_audio

    model = asv.load("exp/demo")  # a run folder (its `best`) or a checkpoint folder, on the CPU
    corpus = "data/demo/corpus"
    a, b = f"{corpus}/spk00/sess0/utt0.wav", f"{corpus}/spk00/sess1/utt0.wav"
    emb = model.embed([a, b])  # (2, E) raw embeddings, as evaluation scores them
    same = model.embed(load_audio(a, model.sample_rate))  # a waveform (T,) at model.sample_rate -> (1, E): emb[:1]
    print(emb.shape, model.score(a, b))  # cosine (AS-norm when the run's config has score.asnorm)

    for name, speaker in [("alice", "spk00"), ("bob", "spk01"), ("carol", "spk03")]:
        model.enroll(name, [f"{corpus}/{speaker}/sess{s}/utt1.wav" for s in range(3)])
    test = f"{corpus}/spk00/sess2/utt3.wav"
    result = model.verify("alice", test, threshold="eer")  # the validation speakers' EER threshold
    print(result.accept, result.score, result.llr, result.description)
    ranked = model.identify(test, top=2)  # [("alice", score), (runner-up, score)]

    files = [f"{corpus}/spk0{i}/sess0/utt2.wav" for i in range(4)]
    matrix = model.score_matrix(files, files)  # (4, 4), symmetric
    cross = model.score_matrix(files, [a, b])  # (4, 2)
    model.save_enrolled("enrolled.npz")  # later: model.load_enrolled("enrolled.npz")

Embeddings come from asv.embed's `eval_loader` and `embed`, the code evaluation runs: whole
recordings, length-sorted batches within data.eval_batch_secs (0: per device), too-short ones repeated to the
model's minimum, the upstream on data.eval_chunk_secs windows when set. So a file, the same file
read with asv.audio.load_audio, and evaluate_asv.py all give one embedding. The API runs in this
process, in full precision, on `device` (no Accelerator: its state is shared by every
Accelerator of a process, so a notebook could not pick a device per model).

Degenerate input is refused in one line naming the file, as evaluation refuses it: a recording shorter
than the model's receptive field (models.min_input_samples) or without speech energy (RMS below
asv.embed.NO_SPEECH_RMS, -80 dBFS) would otherwise score any other recording as the same speaker.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from .metrics import load_calibration, resolve_threshold
from .data import read_audio_list, read_manifest
from .embed import Extractors, audio_durations, check_lengths, cohort_paths, embed, eval_loader, load_extractors
from .run import atomic_write, resolve_checkpoint
from .models import asnorm_scores, cohort_stats, cosine_scores


@dataclass
class Verification:
    """One verify() or compare() decision: accept = score >= threshold.

    score is the raw cosine, the scale the thresholds and the calibration are measured on (validation
    has no AS-norm); llr is None when the checkpoint has no calibration.json; asnorm is the AS-norm
    score when the run's config has score.asnorm (not decided on). threshold=None: no decision.
    """
    score: float
    llr: float | None
    threshold: float | None
    threshold_name: str | None
    description: str
    accept: bool | None
    asnorm: float | None = None


def load(path, device: str = "cpu", overrides: list[str] = ()) -> "Model":
    """A run folder (its `best` checkpoint) or a checkpoint folder (step-N, best) -> a Model on `device`.

    `overrides` are config keys as on the command line (e.g. ["score.asnorm=true"]). Files are read
    in this process (num_workers=0) unless an override says otherwise.
    """
    return Model(load_extractors([resolve_checkpoint(path)], ["num_workers=0", *overrides]), device)


class Model:
    """One checkpoint, ready to embed and score; build it with asv.load. Enrolled speakers live in
    `enrolled` (name -> unit vector (E,))."""

    def __init__(self, ex: Extractors, device: str = "cpu", accelerator=None):
        """`accelerator`: evaluate_asv.py's, so --pair embeds on its device and processes; else this process."""
        self.cfg, self.checkpoint = ex.cfg, ex.ckpts[0]
        self.sample_rate: int = ex.cfg.data.sample_rate
        self._run = accelerator or _OneProcess(device)
        self._upstream = ex.upstreams[0].to(self._run.device)
        self._encoder = ex.encoders[0].to(self._run.device)
        self._min_samples = ex.min_samples
        self._cohort: np.ndarray | None = None  # (K, E) AS-norm cohort, embedded on first use
        self._weights_id: str | None = None
        self.enrolled: dict[str, np.ndarray] = {}

    def __repr__(self):
        return (f"Model({self.checkpoint}: {self.cfg.upstream.name} + {self.cfg.downstream.name}, "
                f"{self.sample_rate} Hz, {self.embed_dim}-d, {len(self.enrolled)} enrolled)")

    @property
    def embed_dim(self) -> int:
        return self._encoder.downstream.embed_dim

    # ------------------------------------------------------------------ embeddings and scores

    def embed(self, inputs) -> np.ndarray:
        """Audio files, a folder (every audio file under it, in sorted path order), or waveforms (T,) at
        `sample_rate` (numpy or torch), one or a list -> (N, E) float32 raw (not L2-normalised) embeddings."""
        return self._embed(_items(inputs))

    def score(self, a, b) -> float:
        """Two recordings (a file or a waveform each) -> their score: cosine, or AS-norm when the run's
        config has score.asnorm (the score evaluation writes)."""
        emb = self._embed(_one(a, "a") + _one(b, "b"))  # (2, E)
        return float(self._scores(emb[:1], emb[1:])[0, 0])

    def score_matrix(self, a, b) -> np.ndarray:
        """Two lists of recordings (or folders) -> (N, M) scores of every pair, as `score` scores them."""
        first, second = _items(a), _items(b)
        emb = self._embed(first + second)  # one pass over both lists
        return self._scores(emb[:len(first)], emb[len(first):])

    # ------------------------------------------------------------------ enrolled speakers

    def enroll(self, speaker: str, inputs) -> np.ndarray:
        """Enroll (or re-enroll) `speaker` from one or more recordings -> their model (E,): the mean of the
        L2-normalised embeddings, normalised again, so every recording counts the same whatever its norm."""
        if not isinstance(speaker, str) or not speaker.strip():
            raise ValueError(f"speaker name must be a non-empty string, got {speaker!r}")
        mean = _unit(self.embed(inputs)).mean(axis=0)  # (E,)
        self.enrolled[speaker] = _unit(mean[None])[0]
        return self.enrolled[speaker]

    def verify(self, speaker: str, test, threshold: str | float | None = "eer") -> Verification:
        """Is `test` (a file or a waveform) the enrolled `speaker`? `threshold`: a name asv.metrics
        resolves on this checkpoint's validation scores (eer, min_dcf:<p>, far:<rate>, frr:<rate>,
        bayes:<p>), a number on the raw cosine scale, or None (scores only)."""
        if speaker not in self.enrolled:
            known = ", ".join(sorted(self.enrolled)) or "none: call enroll(speaker, files) first"
            raise ValueError(f"speaker {speaker!r} is not enrolled (enrolled: {known})")
        limit = self._threshold(threshold)  # a bad name stops here, before any embedding
        return self._verdict(self.enrolled[speaker][None], self._embed(_one(test, "test")), limit)

    def compare(self, a, b, threshold: str | float | None = "eer") -> Verification:
        """Are two recordings (a file or a waveform each) the same speaker? As verify; evaluate_asv.py --pair."""
        limit = self._threshold(threshold)
        emb = self._embed(_one(a, "a") + _one(b, "b"))  # (2, E)
        return self._verdict(emb[:1], emb[1:], limit)

    def identify(self, test, top: int = 3) -> list[tuple[str, float]]:
        """The `top` enrolled speakers closest to `test` (a file or a waveform), best first: [(speaker, score)],
        scored as `score` scores."""
        if not self.enrolled:
            raise ValueError("no enrolled speakers: call enroll(speaker, files) first")
        if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
            raise ValueError(f"top must be a whole number >= 1, got {top!r}")
        names = list(self.enrolled)
        scores = self._scores(np.stack([self.enrolled[n] for n in names]), self._embed(_one(test, "test")))[:, 0]
        return [(names[i], float(scores[i])) for i in np.argsort(-scores, kind="stable")[:top]]

    def save_enrolled(self, path):
        """The enrolled speakers -> an .npz (written whole), tied to this checkpoint's weights."""
        if not self.enrolled:
            raise ValueError("no enrolled speakers to save")
        with atomic_write(path, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez(f, speakers=np.array(list(self.enrolled), dtype=str), embeddings=np.stack(list(
                self.enrolled.values())), weights=np.array(self._weights()))

    def load_enrolled(self, path) -> list[str]:
        """Add the speakers save_enrolled wrote (same names are replaced); returns their names."""
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such file")
        try:
            with np.load(path) as saved:
                speakers, vectors, weights = saved["speakers"].tolist(), saved["embeddings"], str(saved["weights"])
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: not a file save_enrolled wrote ({' '.join(str(e).split())})") from None
        if weights != self._weights():
            raise ValueError(f"{path}: enrolled with other weights than {self.checkpoint}: enroll again")
        self.enrolled.update(zip(speakers, vectors))
        return speakers

    # ------------------------------------------------------------------ internals

    def _embed(self, items: list) -> np.ndarray:
        """Files (str) and waveforms (T,) -> (N, E), through evaluation's loader and embed()."""
        durations = [x.numel() / self.sample_rate if isinstance(x, torch.Tensor) else audio_durations([x], {})[0]
                     for x in items]  # for length-sorted batches; a missing or unreadable file stops here
        names = [x if isinstance(x, str) else f"waveform {i} ({x.numel()} samples)" for i, x in enumerate(items)]
        check_lengths(names, durations, self.sample_rate, self._min_samples)  # too short: refused before embedding
        loader = self._run.prepare(eval_loader(items, durations, self.cfg, self._min_samples, self._run.device))
        chunk = int(self.cfg.data.eval_chunk_secs * self.sample_rate)
        (table,), _ = embed(self._run, [self._upstream], [self._encoder], loader, len(items), -1, chunk, names=names)
        return table

    def _threshold(self, threshold: str | float | None) -> tuple[float | None, str | None, str]:
        """verify's `threshold` -> (raw cosine value, name, description); (None, None, ...) for no decision."""
        if threshold is None:
            return None, None, "no threshold: no decision"
        if isinstance(threshold, str):
            value, description = resolve_threshold(self.checkpoint, threshold)
            return value, threshold, description
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
            raise ValueError(f"threshold {threshold!r}: expected a finite number on the raw cosine scale, a name "
                             "(eer, min_dcf:<p>, far:<rate>, frr:<rate>, bayes:<p>) or None")
        return float(threshold), "value", "given by the caller"

    def _verdict(self, a: np.ndarray, b: np.ndarray, limit: tuple) -> Verification:
        """Embeddings (1, E) and (1, E) and a _threshold -> the decision on their raw cosine (see Verification)."""
        score = float(cosine_scores(np.concatenate([a, b]), np.array([0]), np.array([1]))[0])
        asnorm = float(self._scores(a, b)[0, 0]) if self.cfg.score.asnorm else None
        calibration = load_calibration(self.checkpoint)
        llr = float(calibration.llr(score)) if calibration is not None and calibration.fitted else None
        value, name, description = limit
        accept = None if value is None else score >= value
        return Verification(score, llr, value, name, description, accept, asnorm)

    def _scores(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(N, E) x (M, E) -> (N, M): evaluation's cosine, then AS-norm when score.asnorm is on."""
        table = np.concatenate([a, b])
        rows_a, rows_b = np.arange(len(a))[:, None], len(a) + np.arange(len(b))[None, :]  # (N, 1), (1, M)
        pairs_a, pairs_b = np.broadcast_arrays(rows_a, rows_b)  # (N, M) each
        raw = cosine_scores(table, pairs_a.ravel(), pairs_b.ravel()).reshape(len(a), len(b))
        if not self.cfg.score.asnorm:
            return raw
        mean, std = cohort_stats(table, self._cohort_embeddings(), self.cfg.score.top_k)  # (N + M,) each
        return asnorm_scores(raw, rows_a, rows_b, mean, std)  # the (N, 1) and (1, M) rows broadcast to (N, M)

    def _cohort_embeddings(self) -> np.ndarray:
        """The run's AS-norm cohort (training utterances, as evaluation picks them): (K, E), embedded once."""
        if self._cohort is None:
            paths = cohort_paths(read_manifest(self.cfg.data.dir), self.cfg.score.cohort_size)
            if not paths:
                raise ValueError(f"score.asnorm needs training utterances in {self.cfg.data.dir} for its cohort")
            self._cohort = self._embed(paths)
        return self._cohort

    def _weights(self) -> str:
        """sha1 of the checkpoint's model.pt: enrolled vectors mean something only to the weights that made them."""
        if self._weights_id is None:
            with open(self.checkpoint / "model.pt", "rb") as f:
                self._weights_id = hashlib.file_digest(f, "sha1").hexdigest()
        return self._weights_id


# ---------------------------------------------------------------------------- inputs

def _items(inputs) -> list:
    """What embed takes -> file paths (str) and waveforms (T,) float32 tensors; bad input: one line."""
    single = isinstance(inputs, (str, os.PathLike, np.ndarray, torch.Tensor))
    if not single and not isinstance(inputs, (list, tuple)):
        raise ValueError(f"expected audio files, a folder or waveforms, got {type(inputs).__name__}")
    if not single and not inputs:
        raise ValueError("no audio given: an empty list")
    items = []
    for i, x in enumerate([inputs] if single else inputs):
        where = "" if single else f"item {i}: "
        if isinstance(x, (str, os.PathLike)):
            items += read_audio_list(str(x))[1] if os.path.isdir(x) else [str(x)]
        elif isinstance(x, (np.ndarray, torch.Tensor)):
            items.append(_waveform(x, where))
        else:
            raise ValueError(f"{where}expected an audio file, a folder or a waveform, got {type(x).__name__}")
    return items


def _one(x, what: str) -> list:
    """Exactly one recording (a file or a waveform), as a one-item list."""
    if isinstance(x, (list, tuple)):
        raise ValueError(f"{what}: expected one audio file or waveform, got a list of {len(x)}")
    if isinstance(x, (str, os.PathLike)) and os.path.isdir(x):
        raise ValueError(f"{what}: expected one audio file or waveform, got the folder {x}")
    return _items(x)


def _waveform(x, where: str) -> torch.Tensor:
    """A mono waveform at the model's rate, as load_audio returns it: (T,) float32."""
    wav = torch.as_tensor(x).detach().cpu()
    if wav.ndim != 1:
        raise ValueError(f"{where}a {wav.ndim}-D array of shape {tuple(wav.shape)}: give one mono waveform (T,) "
                         "per recording (a list of them for several)")
    if not wav.is_floating_point():
        raise ValueError(f"{where}a waveform of {wav.dtype} samples: give float samples in [-1, 1]")
    if wav.numel() == 0:
        raise ValueError(f"{where}an empty waveform")
    if not torch.isfinite(wav).all():
        raise ValueError(f"{where}the waveform holds NaN or inf samples")
    if not wav.any():
        raise ValueError(f"{where}a silent waveform (every sample is zero)")
    return wav.float()


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm: (N, E) -> (N, E)."""
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)


# ---------------------------------------------------------------------------- one process, no Accelerator

class _OneProcess:
    """What asv.embed.embed asks of an Accelerator, for this process alone on one device, full precision."""
    is_main_process = True

    def __init__(self, device):
        self.device = torch.device(device)

    def prepare(self, loader):
        return _OnDevice(loader, self.device)

    def autocast(self):
        return contextlib.nullcontext()

    def unwrap_model(self, model):
        return model

    def pad_across_processes(self, tensor, pad_index=0):
        return tensor

    def gather_for_metrics(self, tensor):
        return tensor


class _OnDevice:
    """A loader whose batches (wavs (B, T), lengths (B,), index (B,)) arrive on `device`, as Accelerate's do."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for wavs, lengths, index in self.loader:
            yield wavs.to(self.device), lengths.to(self.device), index
