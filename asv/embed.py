"""Evaluation: checkpoint -> extractor, embeddings (batched, masked, exact), the feature cache, scores and
result sets for trial lists."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import metrics
from .audio import header_frames, progress
from .config import Config
from .data import (Trials, UtteranceDataset, collate_padded, length_batches, loader_workers, open_store, read_manifest,
                   read_trials, trial_lists)
from .models import (
    Extractor,
    SpeakerEncoder,
    asnorm_scores,
    build_encoder,
    build_upstream,
    cohort_stats,
    cosine_scores,
    load_model_file,
    min_input_samples,
    model_meta,
    run_chunked,
)
from .models.onednn import onednn_linear
from .models.upstream import FEATURES
from .run import (atomic_write, check_replaceable, data_fingerprint, eval_overrides, recover_dir, replace_dir,
                  resolve_checkpoint, run_config, run_folder, write_text)
from .metrics import VALID_SCORES, calibration_line, calibration_metrics, ensure_calibration, has_validation_scores

FORMAT = 2  # bump when the upstream code or the entry format changes: old entries are then never read


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def upstream_identity(cfg, upstream: torch.nn.Module) -> dict:
    """Everything that decides the hidden states a frozen upstream gives an audio file at evaluation; the weights
    by their content (a checkpoint replaced by another of the same size and time is another upstream)."""
    u = cfg.upstream
    return {"format": FORMAT, "upstream": dataclasses.asdict(u), "layers": list(getattr(upstream, "layers", [0])),
            "sample_rate": cfg.data.sample_rate, "eval_chunk_secs": cfg.data.eval_chunk_secs,
            "mixed_precision": cfg.train.mixed_precision, "weights_sha256": weights_digest(upstream)}


class FeatureCache:
    """Hidden states per audio file for one upstream identity (see the module docstring). Each entry is an .npz
    of the hidden states (layers, frames, dim) float16 and their CRC-32: a truncated, zero-filled, rewritten or
    misshapen entry is named, removed and computed again, never used."""

    def __init__(self, folder, cfg, upstream: torch.nn.Module):
        if cfg.upstream.trainable:
            raise ValueError("--feature-cache: upstream.trainable=true gives every checkpoint its own upstream; "
                             "there is nothing to share between evaluations")
        identity = upstream_identity(cfg, upstream)
        self.layers = len(identity["layers"])
        self.dir = Path(folder) / _digest(json.dumps(identity, sort_keys=True))[:16]
        with atomic_write(self.dir / "identity.json", shared=True) as f:
            f.write(json.dumps(identity, indent=2) + "\n")
        self.found = self.written = self.bytes_written = 0
        self.bad: list[str] = []  # one line per unusable entry found (embed_files prints them)

    def entry(self, path: str) -> Path:
        st = os.stat(path)
        key = _digest(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}")
        return self.dir / key[:2] / f"{key}.npz"

    def load(self, path: str) -> np.ndarray | None:
        """The stored hidden states of audio file `path`, or None: absent, or unusable (then removed and said)."""
        entry = self.entry(path)
        if not entry.is_file():
            return None
        try:
            with np.load(entry) as saved:  # allow_pickle=False: an object array is refused, never unpickled
                hidden, crc = saved["hidden"], int(saved["crc32"])
            if hidden.ndim != 3 or hidden.shape[0] != self.layers or hidden.dtype != np.float16 or not hidden.size:
                problem = f"holds {hidden.dtype} {hidden.shape}, not ({self.layers} layers, frames, dim) float16"
            elif zlib.crc32(hidden.tobytes()) != crc:
                problem = "fails its checksum (overwritten or zero-filled)"
            else:
                return hidden
        except Exception as e:  # truncated, not an .npz, an object array
            problem = f"unreadable ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
        self.bad.append(f"note: feature cache entry {entry} (of {path}) {problem}: removed, computed again")
        entry.unlink(missing_ok=True)
        return None

    def has(self, path: str) -> bool:
        return self.load(path) is not None

    def store(self, path: str, hidden: np.ndarray):
        """hidden (layers, frames, dim) float16 -> the entry of `path`, unless another process wrote it already."""
        entry = self.entry(path)
        if entry.is_file():
            return
        with atomic_write(entry, "wb", shared=True) as f:  # a file object: np.savez would append .npz to a path
            np.savez(f, hidden=hidden, crc32=np.array(zlib.crc32(hidden.tobytes()), dtype=np.int64))
        self.written += 1
        self.bytes_written += entry.stat().st_size

    def writer(self, paths: list[str]):
        """A callback for embed(): stores each row's valid frames of every layer; `index` indexes `paths`."""
        def store(index: torch.Tensor, hidden: list[torch.Tensor], frames: torch.Tensor):
            for row, (i, n) in enumerate(zip(index.tolist(), frames.tolist())):
                self.store(paths[i], torch.stack([h[row, :n] for h in hidden]).to(torch.float16).cpu().numpy())
        return store

    def folder_mb(self) -> float:
        return sum(f.stat().st_size for f in self.dir.glob("*/*.npz")) / 2**20

    def summary(self, total: int) -> str:
        return (f"feature cache {self.dir}: {self.found} of {total} files found; wrote {self.written} "
                f"({self.bytes_written / 2**20:.1f} MB); the folder holds {self.folder_mb():.1f} MB")


class StoredHidden(torch.utils.data.Dataset):
    """Cache entries (checked by FeatureCache.load first): index -> (hidden (layers, frames, dim) float16, index)."""

    def __init__(self, entries: list[Path]):
        self.entries = entries

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        with np.load(self.entries[index]) as saved:
            return torch.from_numpy(saved["hidden"]), index


def collate_hidden(items):
    """[((L, T_i, D), index)] -> ([(B, T, D) float32] * L zero-padded, frames (B,), indices (B,)): what an
    upstream returns, in the place of (wavs, lengths, indices)."""
    frames = torch.tensor([h.shape[1] for h, _ in items], dtype=torch.long)
    layers, _, dim = items[0][0].shape
    padded = torch.zeros(layers, len(items), int(frames.max()), dim)
    for row, (h, _) in enumerate(items):
        padded[:, row, : h.shape[1]] = h.float()
    return list(padded.unbind(0)), frames, torch.tensor([i for _, i in items], dtype=torch.long)


class PassThrough(torch.nn.Module):
    """Stands in for the upstream when the loader yields stored hidden states: returns them as they come."""

    def forward(self, hidden: list[torch.Tensor], frames: torch.Tensor):
        return hidden, frames


@dataclass
class Extractors:
    """Models of one run's checkpoints. With a frozen upstream every entry shares one upstream object."""
    cfg: Config
    ckpts: list[Path]
    upstreams: list[torch.nn.Module]
    encoders: list[torch.nn.Module]
    overrides: dict = dataclasses.field(default_factory=dict)  # result-changing overrides (asv.run.eval_overrides)

    def extractor(self, i: int = 0) -> Extractor:
        return Extractor(self.upstreams[i], self.encoders[i]).eval()

    @property
    def min_samples(self) -> int:
        return min_input_samples(self.upstreams[0], self.encoders[0])


def meta_of(cfg: Config, upstream) -> dict:
    return model_meta(cfg.upstream.name, getattr(upstream, "layers", [0]), cfg.downstream)


def build_models(cfg: Config, upstream=None):
    """A fresh (upstream, encoder) for `cfg`; pass an upstream to share a frozen one."""
    upstream = upstream or build_upstream(cfg.upstream, cfg.data.sample_rate, cfg.featurizer.layer_selections)
    return upstream, build_encoder(upstream, cfg.downstream, cfg.featurizer.normalize)


def load_extractors(ckpt_dirs: list, overrides: list[str] = ()) -> Extractors:
    """Checkpoint folders of ONE run (step-N or best) -> their models, in eval mode, on the CPU."""
    ckpts = [resolve_checkpoint(c) for c in ckpt_dirs]  # a run folder stands for its best
    runs = {c.absolute().parent for c in ckpts}
    if len(runs) != 1:
        raise ValueError(f"checkpoint folders come from {len(runs)} runs; evaluate one run at a time")
    cfg = run_config(ckpts[0], overrides)
    shared, _ = build_models(cfg) if not cfg.upstream.trainable else (None, None)
    upstreams, encoders = [], []
    for ckpt in ckpts:
        upstream, encoder = build_models(cfg, shared)
        load_model_file(str(ckpt / "model.pt"), encoder, upstream, meta_of(cfg, upstream))
        if getattr(upstream, "lora_rank", 0):  # evaluation and export run plain weights
            upstream.merge_lora()
        upstreams.append(upstream.eval())
        encoders.append(encoder.eval())
    return Extractors(cfg, ckpts, upstreams, encoders, eval_overrides(ckpts[0], cfg))


def audio_durations(paths: list[str], known: dict[str, float]) -> list[float]:
    """Durations from the manifest, or from the file header for files outside it."""
    out = []
    for p in paths:
        if p not in known:
            if not os.path.isfile(p):
                raise ValueError(f"{p}: no such file")
            try:
                frames, rate = header_frames(p)
            except Exception as e:
                raise ValueError(f"{p}: unreadable audio ({' '.join(str(e).split())})") from None
            known[p] = frames / rate
        out.append(known[p])
    return out


# Below this RMS (full scale 1.0), -80 dBFS, a recording holds no speech energy and is refused: silence in 16-bit
# audio (dither, a quiet room) sits near 3e-5 (-90 dBFS); speech, even quiet telephone speech, is above 1e-3.
NO_SPEECH_RMS = 1e-4


def check_lengths(names: list[str], durations: list[float], sample_rate: int, min_samples: int):
    """A one-line ValueError naming the first recording shorter than the model's receptive field (min_samples):
    its embedding would come from a few samples repeated, and score any other recording as the same speaker."""
    for name, secs in zip(names, durations):
        if round(secs * sample_rate) < min_samples:
            raise ValueError(f"{name}: {1000 * secs:.1f} ms of audio, shorter than the model's receptive field "
                             f"({min_samples} samples = {1000 * min_samples / sample_rate:.0f} ms at {sample_rate} Hz): "
                             "too short to embed")



# data.eval_batch_secs 0: the fastest batching where evaluation runs (benchmarks/benchmark.py --only evaluation).
# CPU, log-mel features: 60 s batches (2 AMD EPYC cores, torch's threads, two runs: 1.5-2.5x one utterance per
# batch for the log-mel x-vector). CPU, SSL upstream: one utterance per batch, on any thread count. Its products
# cost the same either way, and large batches add padding and page faults for their temporaries: WavLM Base+,
# 5 checkpoints, 40 utterances, 2 AMD EPYC cores, quiet machine, 2026-12-02: 13.9 s wall (20.8 s user, 2.5 s
# system) one utterance per batch against 19.9 s (21.2, 11.9) in 60 s batches on two threads, 21.1 s against
# 27.6 s on one. GPU: 600 s, as one utterance leaves most of the device idle.
# Every normalisation is per utterance, so the choice changes speed and memory, not embeddings.
CPU_EVAL_BATCH_SECS, GPU_EVAL_BATCH_SECS = 60.0, 600.0
ONE_UTTERANCE = 1e-9  # a budget below any file's length: each batch holds one utterance


def eval_batch_secs(cfg: Config, device) -> float:
    """Audio seconds per evaluation batch on `device`: data.eval_batch_secs, or the device's fastest when it is 0."""
    if cfg.data.eval_batch_secs > 0:
        return cfg.data.eval_batch_secs
    if torch.device(device).type != "cpu":
        return GPU_EVAL_BATCH_SECS
    if cfg.upstream.name not in FEATURES:
        return ONE_UTTERANCE
    return CPU_EVAL_BATCH_SECS


def eval_loader(paths: list[str], durations: list[float], cfg: Config, min_samples: int, device, store=None):
    """Length-sorted batches of whole utterances, as large as eval_batch_secs(cfg, device) allows; `store` (a
    ShardStore): the manifest's files from it."""
    batches = length_batches(durations, eval_batch_secs(cfg, device))
    return torch.utils.data.DataLoader(UtteranceDataset(paths, cfg.data.sample_rate, min_samples, store),
                                       batch_sampler=batches, collate_fn=collate_padded,
                                       num_workers=loader_workers(cfg.num_workers),
                                       pin_memory=torch.cuda.is_available())


def device_of(module: torch.nn.Module, fallback: torch.device) -> torch.device:
    """Where a module's weights are, so where its input must go: its first parameter or buffer."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return fallback


def to_device(x, device: torch.device):
    """A batch tensor, or a list of them (stored hidden states), onto `device`; non_blocking: from pinned
    memory the copy overlaps the work already queued."""
    if isinstance(x, (list, tuple)):
        return [t.to(device, non_blocking=True) for t in x]
    return x.to(device, non_blocking=True)


def check_embedded(names: list[str], rms, peak, done, finite):
    """embed()'s refusals, in one line naming the first file: no speech energy, or a NaN/inf embedding (with why)."""
    quiet = np.flatnonzero(rms < NO_SPEECH_RMS)
    if len(quiet):
        more = f" ({len(quiet) - 1} more such file(s))" if len(quiet) > 1 else ""
        raise ValueError(f"{names[quiet[0]]}: no speech energy (RMS {rms[quiet[0]]:.1e} of full scale, below "
                         f"{NO_SPEECH_RMS:g} = -80 dBFS): nothing to embed{more}")
    broken = np.flatnonzero(done & ~finite)
    if len(broken):
        first = broken[0]
        more = f" ({len(broken) - 1} more such file(s))" if len(broken) > 1 else ""
        if np.isnan(peak[first]):  # no samples seen: embedded from the feature cache
            why = "from its hidden states in the feature cache"
        elif peak[first] > 1:
            why = f"its samples reach {peak[first]:.1e}, far outside [-1, 1]: scale the audio to full scale 1.0"
        elif len(broken) == done.sum():
            why = "so is every other one: the checkpoint's weights are likely NaN or inf"
        else:
            why = "its samples are finite and within [-1, 1]"
        raise ValueError(f"{names[first]}: its embedding is NaN or inf ({why}){more}")


@torch.no_grad()
def embed(accelerator, upstreams, encoders, loader, num_utts: int, max_batches: int = -1, chunk_samples: int = 0,
          store=None, names: list[str] | None = None):
    """Embed every utterance of a (prepared) loader with each (upstream, encoder) pair.

    Returns (list of (U, E) float32 arrays, one per encoder; (U,) bool, True where embedded).
    Pairs that share an upstream object share its pass. Utterances are placed by their index, so
    the padding duplicates that even batches add under several processes are harmless. `store(index,
    hidden, frames)` is handed each upstream pass (FeatureCache.writer). `names` (one per utterance): refuse
    recordings without speech energy (RMS of their samples below NO_SPEECH_RMS), and any whose embedding is NaN
    or inf (samples of 1e30 overflow the features), with a one-line ValueError naming the first, raised on every
    process alike once all are embedded (so none waits on another).
    """
    modules = [*upstreams, *encoders]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    groups: dict[int, list[int]] = {}  # id(upstream) -> indices of the encoders that read it
    for i, u in enumerate(upstreams):
        groups.setdefault(id(u), []).append(i)
    # unwrap only what training wrapped (DDP): unwrap_model imports torch._dynamo, ~3 s of every evaluation
    plain = [e if isinstance(e, SpeakerEncoder) else accelerator.unwrap_model(e) for e in encoders]
    tables = [np.zeros((num_utts, e.downstream.embed_dim), np.float32) for e in plain]
    # a PassThrough upstream has no weights: its batch (stored hidden states) goes where the encoder is
    devices = {key: device_of(upstreams[m[0]], device_of(encoders[m[0]], accelerator.device))
               for key, m in groups.items()}
    done = np.zeros(num_utts, dtype=bool)
    rms = np.full(num_utts, np.inf)  # of each utterance's own samples (its padding left out)
    peak = np.full(num_utts, np.nan)  # the largest |sample|, to say why an embedding is not finite
    finite = np.ones(num_utts, dtype=bool)  # every embedding of the utterance (one per encoder) is finite
    total = len(loader) if max_batches < 0 else min(len(loader), max_batches)
    bar = progress(loader, total=total, desc="embedding", unit="batch", enabled=accelerator.is_main_process)
    for n, (wavs, lengths, index) in enumerate(bar):
        if n == max_batches:
            break
        embs = [None] * len(encoders)
        with accelerator.autocast(), onednn_linear(accelerator.device):
            for key, members in groups.items():
                device = devices[key]
                hidden, frames = run_chunked(upstreams[members[0]], to_device(wavs, device),
                                             to_device(lengths, device), chunk_samples)
                if store:
                    store(index, hidden, frames)
                for i in members:
                    embs[i] = encoders[i](hidden, frames).float()
        if names is not None and isinstance(wavs, torch.Tensor):  # stored hidden states passed the check when stored
            mask = torch.arange(wavs.shape[1], device=wavs.device)[None, :] < lengths[:, None]
            energy = ((wavs.double() ** 2) * mask).sum(1) / lengths.clamp(min=1)
            energy = accelerator.gather_for_metrics(accelerator.pad_across_processes(energy.sqrt())).cpu().numpy()
            top = (wavs.double().abs() * mask).amax(1)
            top = accelerator.gather_for_metrics(accelerator.pad_across_processes(top)).cpu().numpy()
        # batches differ in size between processes: pad to a common size, gather, drop the pads
        index = accelerator.gather_for_metrics(accelerator.pad_across_processes(index, pad_index=-1)).cpu().numpy()
        real = index >= 0
        if names is not None and isinstance(wavs, torch.Tensor):
            rms[index[real]], peak[index[real]] = energy[real], top[real]
        for table, emb in zip(tables, embs):
            rows = accelerator.gather_for_metrics(accelerator.pad_across_processes(emb)).cpu().numpy()[real]
            table[index[real]] = rows
            finite[index[real]] &= np.isfinite(rows).all(axis=1)
        done[index[real]] = True
    for m, mode in zip(modules, was_training):
        m.train(mode)
    if names is not None:
        check_embedded(names, rms, peak, done, finite)
    return tables, done


def embed_files(accelerator, ex: Extractors, paths: list[str], durations: list[float] | None = None,
                cache: FeatureCache | None = None):
    """Every file embedded by every checkpoint of `ex`: ((N, E) per checkpoint, (N,) done). With a feature
    cache, files found in it skip decoding and the upstream; the others' hidden states are stored in it."""
    cfg = ex.cfg
    durations = durations if durations is not None else audio_durations(paths, {})
    check_lengths(paths, durations, cfg.data.sample_rate, ex.min_samples)
    accelerator.print(f"embedding {len(paths)} files with {len(ex.ckpts)} checkpoint(s) on "
                      f"{accelerator.num_processes} process(es)")
    upstreams = [u.to(accelerator.device) for u in ex.upstreams]
    encoders = [e.to(accelerator.device) for e in ex.encoders]
    chunk_samples = int(cfg.data.eval_chunk_secs * cfg.data.sample_rate)
    store = open_store(cfg)  # data.shards: the manifest's files are read from it
    if cache is None:
        loader = accelerator.prepare(eval_loader(paths, durations, cfg, ex.min_samples, accelerator.device, store))
        return embed(accelerator, upstreams, encoders, loader, len(paths), cfg.eval_batch, chunk_samples, names=paths)
    found = np.array([cache.has(p) for p in paths], dtype=bool)
    cache.found = int(found.sum())
    for line in cache.bad:
        accelerator.print(line)
    tables = [np.zeros((len(paths), e.downstream.embed_dim), np.float32) for e in ex.encoders]
    done = np.zeros(len(paths), dtype=bool)
    for hit in (False, True):
        rows = np.flatnonzero(found == hit)
        if len(rows) == 0:
            continue
        subset, secs = [paths[i] for i in rows], [durations[i] for i in rows]
        if hit:  # stored hidden states in the place of audio, through an upstream that passes them on
            stored = StoredHidden([cache.entry(p) for p in subset])
            loader = torch.utils.data.DataLoader(stored, batch_sampler=length_batches(secs, eval_batch_secs(cfg, accelerator.device)),
                                                 collate_fn=collate_hidden, num_workers=loader_workers(cfg.num_workers),
                                                 pin_memory=torch.cuda.is_available())
            part, part_done = embed(accelerator, [PassThrough()] * len(encoders), encoders,
                                    accelerator.prepare(loader), len(rows), cfg.eval_batch, names=subset)
        else:
            loader = accelerator.prepare(eval_loader(subset, secs, cfg, ex.min_samples, accelerator.device, store))
            part, part_done = embed(accelerator, upstreams, encoders, loader, len(rows), cfg.eval_batch, chunk_samples,
                                    cache.writer(subset), names=subset)
        for table, p in zip(tables, part):
            table[rows] = p
        done[rows] = part_done
    accelerator.print(cache.summary(len(paths)))
    return tables, done


# ---------------------------------------------------------------------------- trials and scores

def trial_audio(trials: Trials, source, by_id: dict, root: str | None = None) -> dict[str, str]:
    """Each enroll/test entry of a list -> its audio file: an utterance id of the manifest, else a
    path under `root`, else a file path (absolute or from the current directory)."""
    out = {}
    # in file order, so that the first bad entry of the list is the one named, on every run
    for entry in dict.fromkeys(e for pair in zip(trials.enroll, trials.test) for e in pair):
        if entry in by_id:
            out[entry] = by_id[entry].path
        elif root and os.path.isfile(os.path.join(root, entry)):
            out[entry] = os.path.abspath(os.path.join(root, entry))
        elif os.path.isfile(entry):
            out[entry] = os.path.abspath(entry)
        else:
            where = f", nor a file under {root}" if root else ""
            raise ValueError(f"{source}: names {entry}, which is neither an utterance id of the manifest{where} "
                             "nor an audio file")
    return out


def trial_rows(row: dict[str, int], trials: Trials, audio: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """A trial list's enroll and test sides as rows of the embedding table: (N,), (N,)."""
    a = np.fromiter((row[audio[e]] for e in trials.enroll), dtype=np.int64, count=len(trials.enroll))
    b = np.fromiter((row[audio[t]] for t in trials.test), dtype=np.int64, count=len(trials.test))
    return a, b


def score_trials(table: np.ndarray, done: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine-score the trials (rows a, b) whose two sides were embedded -> (scores, kept-trial mask)."""
    keep = done[a] & done[b]
    return cosine_scores(table, a[keep], b[keep]), keep


def validation_metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
    """metrics.compute_metrics plus the mean target minus mean non-target score (a continuous tie-break)."""
    result = metrics.compute_metrics(scores, labels)
    target = labels == 1
    result["score_margin"] = float(scores[target].mean() - scores[~target].mean())
    return result


def eval_folder(ckpt: Path, name: str, source: Path | None = None, overrides: dict | None = None) -> Path:
    """Where one list's results go: eval/<name> for the data folder's lists; a list given as a file gets
    its name plus a hash of its path, so it can never overwrite the run's own valid/test results; an
    evaluation with result-changing config overrides gets @<hash of them>: eval/test@1a2b3c4d."""
    if source is not None:
        name += "-" + hashlib.sha1(str(Path(source).resolve()).encode()).hexdigest()[:8]
    if overrides:
        name += "@" + overrides_hash(overrides)
    return ckpt / "eval" / name


def overrides_hash(overrides: dict) -> str:
    return hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]


def write_eval_set(folder: Path, files: dict[str, str]):
    """One list's results (scores.txt, metrics.json, ...) replace the previous set as a whole."""
    check_replaceable(folder, "result set")
    recover_dir(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed run's half set must not join this one
    tmp.mkdir(parents=True)
    for name, text in files.items():
        (tmp / name).write_text(text, encoding="utf-8")
    replace_dir(tmp, folder)


def scores_text(trials: Trials, keep: np.ndarray, scores: np.ndarray) -> str:
    """`enroll test score label` lines of the kept trials."""
    kept = np.flatnonzero(keep)
    return "".join(f"{trials.enroll[i]} {trials.test[i]} {s:.6f} {trials.labels[i]}\n" for i, s in zip(kept, scores))


def asnorm(table: np.ndarray, done: np.ndarray, cohort_rows: list[int], top_k: int, a, b, scores):
    """AS-norm scores and the cohort settings actually used (top_k cannot exceed the cohort)."""
    members = [r for r in cohort_rows if done[r]]
    used_k = min(top_k, len(members))
    mean, std = cohort_stats(table, table[members], used_k)
    return asnorm_scores(scores, a, b, mean, std), {"cohort_size": len(members), "top_k": used_k}


def cohort_paths(utts, size: int) -> list[str]:
    """Up to `size` training utterances for AS-norm, taken round-robin over speakers (every speaker counts)."""
    by_speaker: dict[str, list[str]] = {}
    for u in sorted(utts, key=lambda u: u.id):
        if u.split == "train":
            by_speaker.setdefault(u.speaker, []).append(u.path)
    rounds = [[paths[i] for paths in by_speaker.values() if i < len(paths)]
              for i in range(max(map(len, by_speaker.values()), default=0))]
    return [p for r in rounds for p in r][:size]


def metrics_line(ckpt, name: str, m: dict) -> str:
    return (f"{ckpt} | {name} | EER {m['eer']:.2f}% | minDCF0.01 {m['min_dcf_0.01']:.4f} "
            f"| minDCF0.05 {m['min_dcf_0.05']:.4f} | {m['num_trials']} trials")


def metrics_json(m: dict) -> str:
    return json.dumps(m, indent=2) + "\n"


# ---------------------------------------------------------------------------- embeddings out

def import_kaldiio():
    try:
        import kaldiio
    except ImportError:
        raise ValueError("--out .ark needs kaldiio: pip install kaldiio") from None
    return kaldiio


def write_embeddings(out: Path, ids: list[str], emb: np.ndarray):
    """emb (N, E) float32 -> out.npz (ids, embeddings) or out.ark + out.scp (Kaldi vectors), atomically."""
    if out.suffix == ".npz":
        with atomic_write(out, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez(f, ids=np.array(ids, dtype=str), embeddings=emb, l2_normalized=np.array(False),
                     note=np.array("embeddings as evaluate_asv.py scores them, not L2-normalised: "
                                   "the score is their cosine similarity"))
        return
    kaldiio = import_kaldiio()
    scp = io.StringIO()
    with atomic_write(out, "wb") as f:
        kaldiio.save_ark(f, dict(zip(ids, emb)), scp=scp)
        ark_tmp = f.name
    # kaldiio writes the ark's own (temporary) name into the scp: point it at the final one
    write_text(out.with_suffix(".scp"), scp.getvalue().replace(f" {ark_tmp}:", f" {out}:"))


@dataclass
class TrialList:
    name: str
    path: Path
    user_file: bool  # given as a file rather than one of the data folder's lists


def resolve_lists(data_dir: str, names_or_files: list[str]) -> list[TrialList]:
    """Trial list names (from data_dir/trials) or files; default: every test list of the data folder."""
    known = trial_lists(data_dir)
    if not names_or_files:
        return [TrialList(k, v, False) for k, v in known.items() if k != "valid"]
    out = []
    for item in names_or_files:
        if item in known:
            out.append(TrialList(item, known[item], False))
        elif Path(item).is_file():
            out.append(TrialList(Path(item).name.removesuffix(".gz").rsplit(".", 1)[0], Path(item), True))
        else:
            raise ValueError(f"trial list '{item}' is neither a file nor one of {', '.join(known) or '(none)'} "
                             f"in {data_dir}/trials")
    return out


def checkpoint_calibrations(accelerator, ckpts: list[Path]) -> dict:
    """{ckpt: its calibration (fit on its validation scores once, then read back), or None without
    validation scores (SUPERB protocol: nothing to fit on; min Cllr needs no calibration)}."""
    cals = {c: ensure_calibration(c) if has_validation_scores(c) else None for c in ckpts}
    missing = [c for c, cal in cals.items() if cal is None]
    if missing:
        accelerator.print(f"note: {len(missing)} checkpoint(s) without validation scores ({missing[0] / VALID_SCORES}"
                          f"{', ...' if len(missing) > 1 else ''}): no calibrated scores, min Cllr only")
    for c, cal in cals.items():
        if cal is not None and cal.refused:
            accelerator.print(f"note: {c}: no calibration ({cal.refused}); raw scores only")
    return cals


def ensure_qmf(ckpt: Path, valid_audio: dict[str, str], speaker_of: dict[str, str], secs: dict[str, float],
               imposter: dict[str, float]) -> metrics.QualityCalibration:
    """The checkpoint's calibration_qmf.json; fit on its validation scores (the plain calibration's), the
    durations of their enrolment and test audio and the audio's imposter means (`imposter`: file -> mean of
    its top-k cohort scores, this checkpoint's embeddings), the measures chosen on held-out validation speakers
    (`speaker_of`: entry -> speaker), and saved first when absent."""
    cal = metrics.load_qmf(ckpt)
    if cal is not None:
        return cal
    path = Path(ckpt) / VALID_SCORES
    scores, labels = metrics.validation_scores(ckpt)
    entries = np.loadtxt(path, usecols=(0, 1), dtype=str, ndmin=2, comments=None)
    unknown = next((e for e in entries.ravel() if valid_audio.get(e) not in imposter), None)
    if unknown is not None:
        raise ValueError(f"{path}: names {unknown}, which the data folder's validation list does not (or which was "
                         "not embedded): QMF is fit on the validation trials' audio")
    side = [[valid_audio[e] for e in entries[:, i]] for i in (0, 1)]
    cal = metrics.fit_qmf(scores, labels, *([secs[f] for f in files] for files in side),
                          *([imposter[f] for f in files] for files in side),
                          speakers=[(speaker_of[a], speaker_of[b]) for a, b in entries])
    metrics.save_qmf(ckpt, cal)
    return cal


@dataclass
class Inputs:
    """Everything an evaluation reads, checked before any model is built."""
    lists: dict[str, tuple[TrialList, Trials, dict[str, str]]]  # key -> (list, its trials, entry -> audio file)
    cohort: list[str]                                            # AS-norm / QMF cohort files ([]: neither)
    paths: list[str]                                             # every file to embed, once
    durations: list[float]
    data: dict = dataclasses.field(default_factory=dict)         # {"data_fingerprint": ...} of data the run was not
                                                                 # trained on (check_data): a result set of its own
    valid: dict[str, str] = dataclasses.field(default_factory=dict)  # QMF: validation entry -> audio file (its fit)
    valid_speakers: dict[str, str] = dataclasses.field(default_factory=dict)  # QMF: validation entry -> speaker


def check_both_kinds(path, trials: Trials):
    """EER and minDCF need target and non-target trials: a list of one kind is refused before any work."""
    if trials.labels.all() or not trials.labels.any():
        raise ValueError(f"{path}: holds only {'target' if trials.labels.all() else 'non-target'} trials; "
                         "an EER needs same- and different-speaker trials")


def unscored(path, trials: Trials, keep: np.ndarray, done: np.ndarray, eval_batch: int) -> str | None:
    """Why the trials of a list whose two sides were embedded (`keep`) give no EER, in a line naming the list; None
    when they hold both kinds. Only eval_batch leaves files out (`done`): a list of one kind is refused before."""
    labels = trials.labels[keep]
    if labels.any() and not labels.all():
        return None
    what = "none of its" if not keep.any() else f"the {keep.sum()} of its"
    kind = "" if not keep.any() else f" ({'target' if labels.all() else 'non-target'} trials only)"
    return (f"{path}: {what} {len(keep)} trials have both sides embedded{kind}, so no EER: eval_batch={eval_batch} "
            f"embedded {done.sum()} of {len(done)} files; raise eval_batch (-1: all)")


def read_inputs(cfg, lists: list[TrialList], trials_root: str | None = None) -> Inputs:
    """Read every list, resolve every entry to a file and every file's duration (a missing or unreadable file
    is a one-line error naming it) before any model work."""
    if not lists:
        raise ValueError(f"no test trial lists in {cfg.data.dir}/trials")
    utts = read_manifest(cfg.data.dir)
    by_id = {u.id: u for u in utts}
    loaded = {}
    for spec in lists:
        trials = read_trials(spec.path)
        check_both_kinds(spec.path, trials)
        loaded[spec.name if not spec.user_file else str(spec.path)] = (spec, trials, trial_audio(
            trials, spec.path, by_id, trials_root))
    qmf = cfg.score.calibration == "qmf"
    cohort = cohort_paths(utts, cfg.score.cohort_size) if cfg.score.asnorm or qmf else []
    if (cfg.score.asnorm or qmf) and not cohort:
        needs = "score.asnorm" if cfg.score.asnorm else "score.calibration=qmf (its imposter means)"
        raise ValueError(f"{needs} needs training utterances in {cfg.data.dir} for its cohort")
    valid_list = trial_lists(cfg.data.dir).get("valid")  # QMF is fit on the validation trials: their audio too
    valid = trial_audio(read_trials(valid_list), valid_list, by_id, trials_root) if qmf and valid_list else {}
    paths = sorted({p for _, _, audio in loaded.values() for p in audio.values()} | set(cohort) | set(valid.values()))
    speakers = {e: by_id[e].speaker if e in by_id else e for e in valid}  # a file outside the manifest: its own
    return Inputs(loaded, cohort, paths, audio_durations(paths, {u.path: u.duration for u in utts}), valid=valid,
                  valid_speakers=speakers)


def check_data(ckpt: Path, cfg, inputs: Inputs) -> Inputs:
    """The data folder against the one the run was trained on (run.json's data_fingerprint). The same data:
    nothing to say. Other data (prepared again, another corpus): refused in one line when a list names an
    utterance of a training speaker of the run (speakers.txt), as the results would claim held-out speakers;
    otherwise the results are labelled with the new fingerprint and go to a set of their own."""
    run = run_folder(ckpt)
    record = run / "run.json"
    recorded = json.loads(record.read_text()).get("data_fingerprint") if record.is_file() else None
    found = data_fingerprint(cfg.data.dir)
    if recorded is None or recorded == found:
        return inputs
    trained = set((run / "speakers.txt").read_text().split()) if (run / "speakers.txt").is_file() else set()
    speaker_of = {u.path: u.speaker for u in read_manifest(cfg.data.dir)}
    for spec, _, audio in inputs.lists.values():
        seen = sorted({speaker_of[p] for p in audio.values() if p in speaker_of} & trained)
        if seen:
            named = ", ".join(seen[:3]) + (", ..." if len(seen) > 3 else "")
            raise ValueError(f"{spec.path}: {len(seen)} of its speakers ({named}) are training speakers of {run}: "
                             f"{cfg.data.dir} is not the data it was trained on (data fingerprint {found}, the run's "
                             f"{recorded}; prepared again?), so these results would not be of held-out speakers; "
                             "evaluate on the run's data")
    return dataclasses.replace(inputs, data={"data_fingerprint": found})


def evaluate_checkpoints(accelerator, ex: Extractors, lists, trials_root: str | None = None,
                         cache: FeatureCache | None = None) -> dict:
    """Evaluate one run's checkpoints on trial lists; returns {ckpt: {eval folder name: metrics}} (main process).

    `lists`: TrialLists, or the Inputs that read_inputs made of them before the models were built."""
    inputs = lists if isinstance(lists, Inputs) else read_inputs(ex.cfg, lists, trials_root)
    cfg, cohort, paths = ex.cfg, inputs.cohort, inputs.paths
    if cohort and len(cohort) < cfg.score.cohort_size:
        accelerator.print(f"note: score.cohort_size={cfg.score.cohort_size}, but {cfg.data.dir} has "
                          f"{len(cohort)} training utterances: the cohort holds them all")
    overrides = {**ex.overrides, **inputs.data}
    cals = checkpoint_calibrations(accelerator, ex.ckpts) if accelerator.is_main_process and not overrides else {}
    if overrides:  # the calibration is fit on validation scores of the run's config and data: it never applies here
        accelerator.print(f"note: {', '.join(f'{k}={v}' for k, v in overrides.items())}: not the run's config or "
                          f"data; results go to eval/<list>@{overrides_hash(overrides)}/, not calibrated")
    secs = dict(zip(paths, inputs.durations))
    row = {p: i for i, p in enumerate(paths)}
    tables, done = embed_files(accelerator, ex, paths, inputs.durations, cache)
    if done.sum() < len(paths):
        accelerator.print(f"note: eval_batch={cfg.eval_batch} embedded {done.sum()} of {len(paths)} utterances; "
                          "trials with the others are left out")
    rows = {key: trial_rows(row, trials, audio) for key, (_, trials, audio) in inputs.lists.items()}
    for key, (spec, trials, _) in inputs.lists.items():  # the same on every process: `done` is gathered
        problem = unscored(spec.path, trials, done[rows[key][0]] & done[rows[key][1]], done, cfg.eval_batch)
        if problem:  # before any result set is written
            raise ValueError(problem)
    out = {}
    for ckpt, table in zip(ex.ckpts, tables):
        out[str(ckpt)] = {}
        qmf = None
        if cfg.score.calibration == "qmf" and cals.get(ckpt) is not None and accelerator.is_main_process:
            # fit on validation trials only, as the plain one; each side's imposter mean from this checkpoint
            members = [row[p] for p in cohort if done[row[p]]]
            mean, _ = cohort_stats(table, table[members], min(cfg.score.top_k, len(members)))
            imposter = {p: float(mean[i]) for p, i in row.items() if done[i]}
            qmf = ensure_qmf(ckpt, inputs.valid, inputs.valid_speakers, secs, imposter)
        for key, (spec, trials, audio) in inputs.lists.items():
            a, b = rows[key]
            scores, keep = score_trials(table, done, a, b)
            if not accelerator.is_main_process:
                continue
            labels, cal = trials.labels[keep], cals.get(ckpt)
            m = {**metrics.compute_metrics(scores, labels), **calibration_metrics(scores, labels, cal)}
            files = {"scores.txt": scores_text(trials, keep, scores)}
            if cal is not None and cal.fitted:
                files["scores_calibrated.txt"] = scores_text(trials, keep, cal.llr(scores))
            line = metrics_line(ckpt, spec.name, m) + calibration_line(m)
            if qmf is not None:  # beside the plain calibration: the same scores, with their quality measures
                kept = np.flatnonzero(keep)
                side = [[audio[names[i]] for i in kept] for names in (trials.enroll, trials.test)]
                llrs = qmf.llr(scores, *([secs[f] for f in files] for files in side),
                               *([imposter[f] for f in files] for files in side))
                m["qmf"] = metrics.qmf_metrics(llrs, labels, qmf)
                files["scores_qmf.txt"] = scores_text(trials, keep, llrs)
                line += (f" | QMF ({qmf.chosen}) Cllr {m['qmf']['cllr']:.3f} "
                         f"actDCF0.01 {m['qmf']['act_dcf_0.01']:.4f}")
            if cfg.score.asnorm:
                normed, used = asnorm(table, done, [row[p] for p in cohort], cfg.score.top_k, a[keep], b[keep], scores)
                m["asnorm"] = {**metrics.compute_metrics(normed, labels), **used}
                files["scores_asnorm.txt"] = scores_text(trials, keep, normed)
                files["metrics_asnorm.json"] = metrics_json(m["asnorm"])
                line += f" | AS-norm EER {m['asnorm']['eer']:.2f}% minDCF0.01 {m['asnorm']['min_dcf_0.01']:.4f}"
            if overrides:
                m["overrides"] = overrides
            files["metrics.json"] = metrics_json(m)
            folder = eval_folder(ckpt, spec.name, spec.path if spec.user_file else None, overrides)
            write_eval_set(folder, files)
            out[str(ckpt)][folder.name] = m
            accelerator.print(line + (f" | {folder}" if spec.user_file or overrides else ""))
    accelerator.wait_for_everyone()
    return out
