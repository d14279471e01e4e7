"""Strict configuration: one dataclass per section, YAML on top, dotted overrides last.

    cfg = load_config("configs/base.yaml", ["train.total_steps=200", "optim.lr=1e-3"])

Every default lives here once, with a comment. Unknown keys and wrong types raise
ConfigError naming the key (with a "did you mean" hint), so a typo never trains the
wrong model silently. `save_config` writes the resolved config into the run folder.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    dir: str = "data/demo"          # a prepare_voxceleb.py output folder
    sample_rate: int = 16000        # model rate; files at other rates are resampled on load
    min_secs: float = 2.0           # shortest random training crop (SUPERB: 2)
    max_secs: float = 8.0           # longest random training crop (SUPERB: 8)
    batch_size: int = 10            # crops per batch per process (SUPERB: 10)
    eval_batch_secs: float = 60.0   # audio seconds per evaluation batch, length-sorted (CPU: 20-60 is fastest; GPU: more)
    eval_chunk_secs: float = 0.0    # >0: upstream on windows this long at evaluation: memory bounded by it, not the longest file


@dataclass
class UpstreamConfig:
    name: str = "wavlm_base_plus"   # fbank | mfcc | wavlm_base(_plus|_large) | hubert_base|hubert_large | wav2vec2_base|_large|_large_lv60k | xlsr53|xlsr_300m
    ckpt: str = ""                  # weights on disk: torchaudio .pth, Hugging Face folder, fairseq/WavLM .pt; empty: torchaudio bundle (hub cache)
    random_init: bool = False       # build the architecture with random weights (tests, benchmarks, no hub)
    arch: dict = field(default_factory=dict)  # architecture overrides for random_init, e.g. {encoder_num_layers: 2}
    trainable: bool = False         # fine-tune the upstream (SUPERB: frozen)
    n_mels: int = 80                # fbank: mel bands
    n_mfcc: int = 40                # mfcc: coefficients


@dataclass
class FeaturizerConfig:
    layer_norm: bool = False        # normalise each layer before the weighted sum (layers differ in scale)


@dataclass
class DownstreamConfig:
    name: str = "xvector"           # xvector (SUPERB x-vector TDNN) | ecapa (ECAPA-TDNN; uses channels, embed_dim)
    proj_dim: int = 512             # projector from the upstream's hidden size
    channels: int = 512             # TDNN channels (SUPERB: 512; ECAPA: 512 or 1024)
    stats_dim: int = 1500           # last frame-level layer before statistics pooling
    embed_dim: int = 512            # speaker embedding size


@dataclass
class LossConfig:
    name: str = "amsoftmax"         # amsoftmax: cos - m (SUPERB) | aamsoftmax: cos(theta + m) (ArcFace)
    margin: float = 0.4             # SUPERB AM-softmax: 0.4
    scale: float = 30.0             # SUPERB AM-softmax: 30
    sub_centers: int = 1            # >1: sub-centre AM/AAM-softmax (K centres per speaker, robust to label noise)
    margin_warmup_start: int = 0    # margin is 0 until this optimizer step...
    margin_warmup_steps: int = 0    # ...then rises linearly to loss.margin over this many steps (0: full margin at once)


@dataclass
class OptimConfig:
    name: str = "adamw"             # adamw | adam | sgd
    lr: float = 1e-4                # peak learning rate (SUPERB: 1e-4)
    weight_decay: float = 0.0       # L2 penalty (decoupled for adamw)
    momentum: float = 0.9           # sgd only


@dataclass
class SchedulerConfig:
    name: str = "constant"          # constant | linear | cosine | exponential (after warm-up; used when train.use_scheduler)
    warmup_steps: int = 0           # linear warm-up from 0 over this many optimizer steps
    final_lr_ratio: float = 0.01    # lr at the last step as a fraction of optim.lr (linear, cosine, exponential)


@dataclass
class AugmentConfig:
    noise_dir: str = ""             # MUSAN-style folder: noise/, music/, speech/ subfolders of wav/flac (empty: off)
    noise_prob: float = 0.0         # probability a crop gets additive noise (one of noise, music, babble)
    noise_snr_min: float = 0.0      # noise/: SNR range in dB (Kaldi/WeSpeaker: 0-15)
    noise_snr_max: float = 15.0
    music_snr_min: float = 5.0      # music/: SNR range in dB (5-15)
    music_snr_max: float = 15.0
    babble_snr_min: float = 13.0    # babble from speech/: SNR range in dB (13-20)
    babble_snr_max: float = 20.0
    babble_speakers_min: int = 3    # babble: speech segments summed (3-7)
    babble_speakers_max: int = 7
    rir_dir: str = ""               # folder of room impulse responses (wav/flac, any depth) (empty: off)
    rir_prob: float = 0.0           # probability a crop is reverberated (before the noise is added)
    speed_prob: float = 0.0         # probability of speed perturbation 0.9 or 1.1 (each factor a new speaker)
    specaug_prob: float = 0.0       # probability an utterance's upstream features get SpecAugment masks
    specaug_time_masks: int = 1     # time masks per utterance
    specaug_time_width: int = 10    # widest time mask in frames (width drawn from 1..this)
    specaug_freq_masks: int = 1     # frequency masks per utterance
    specaug_freq_width: int = 8     # widest frequency mask in bins (width drawn from 1..this)


@dataclass
class ScoreConfig:
    asnorm: bool = False            # also write adaptive s-norm scores (scores_asnorm.txt, metrics_asnorm.json)
    cohort_size: int = 1000         # training utterances in the AS-norm cohort (spread over speakers)
    top_k: int = 300                # closest cohort members per side


@dataclass
class TrainConfig:
    total_steps: int = 200000       # optimizer steps (SUPERB: 200k)
    log_step: int = 500             # print/log loss, accuracy, lr and speed every N steps
    eval_step: int = 10000          # validation EER on the held-out validation speakers every N steps
    save_step: int = 10000          # checkpoint every N steps (and whenever validation improves)
    keep_num_ckpts: int = 3         # keep the newest N step-* folders (<= 0: all); the best is never deleted
    gradient_clipping: float = 3.0  # max global grad norm (0: off)
    gradient_accumulate: int = 5    # micro-batches per optimizer step (SUPERB: 5)
    mixed_precision: str = "no"     # no | fp16 | bf16 (via Accelerate)
    seed: int = 1337                # model init, sample order, crops: the same seed gives the same run
    auto_resume: bool = True        # re-running the same command resumes from the newest complete checkpoint
    resume_ckpt_dir: str = ""       # resume from this step-* folder instead
    init_from: str = ""             # a model.pt to start from (weights only, new optimizer): large-margin fine-tuning
    valid_metric: str = "eer"       # eer | min_dcf_0.01 | min_dcf_0.05: selects exp/<run>/best
    valid_higher_better: bool = False  # false for EER and minDCF (lower is better)
    use_scheduler: bool = False     # SUPERB: constant lr
    test_after_train: bool = True   # evaluate the best checkpoint on the test trial lists at the end
    log_with: str = "tensorboard"   # Accelerate trackers, comma-separated: tensorboard | wandb | comet_ml | mlflow | all | none


@dataclass
class Config:
    exp_dir: str = "exp/run"        # the run folder: config, labels, step-*/ checkpoints, logs
    num_workers: int = 2            # data loader worker processes
    eval_batch: int = -1            # cap validation/evaluation to N batches (-1: all; quick checks only)
    data: DataConfig = field(default_factory=DataConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    featurizer: FeaturizerConfig = field(default_factory=FeaturizerConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


CHOICES = {  # string keys with a closed set of values
    "upstream.name": None,  # checked by models.upstream.build_upstream (it owns the list)
    "downstream.name": ("xvector", "ecapa"),
    "loss.name": ("amsoftmax", "aamsoftmax"),
    "optim.name": ("adamw", "adam", "sgd"),
    "scheduler.name": ("constant", "linear", "cosine", "exponential"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.valid_metric": ("eer", "min_dcf_0.01", "min_dcf_0.05"),
}


def _coerce(value, typ, key):
    """Check one value against its declared type; ints are accepted where floats are expected."""
    if typ is str and value is False:  # YAML 1.1 reads a bare `no` (mixed_precision: no) as false
        return "no"
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"config key '{key}' must be {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def _merge(obj, updates: dict, prefix: str = ""):
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        full = prefix + str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid keys: {', '.join(prefix + n for n in names)})"
            raise ConfigError(f"unknown config key '{full}'{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' is a section; set its fields, e.g. {full}.<key>=...")
            _merge(current, value, full + ".")
        else:
            value = _coerce(value, hints[key], full)
            allowed = CHOICES.get(full)
            if allowed and value not in allowed:
                raise ConfigError(f"config key '{full}' must be one of {', '.join(allowed)}, got {value!r}")
            setattr(obj, key, value)


def parse_override(text: str) -> dict:
    """'train.total_steps=200' -> {'train': {'total_steps': 200}} (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    dotted, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    for part in reversed(dotted.strip().split(".")):
        value = {part: value}
    return value


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    cfg = Config()
    if path:
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        try:
            _merge(cfg, loaded)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for text in overrides:
        _merge(cfg, parse_override(text))
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str):
    """Write the resolved config atomically; loading it back gives the same Config."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)


def reference_rows() -> list[tuple[str, str, str]]:
    """(dotted key, default, comment) for every key, read from this file's source."""
    import inspect
    import re

    sections = {c.__name__: c for c in (DataConfig, UpstreamConfig, FeaturizerConfig, DownstreamConfig, LossConfig,
                                        OptimConfig, SchedulerConfig, AugmentConfig, ScoreConfig, TrainConfig)}
    rows = []

    def walk(cls, prefix):
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s+(\w+): (\w+) = .+?(?:\s+# (.*))?$", line)
            if m and m[2] in sections:
                walk(sections[m[2]], f"{prefix}{m[1]}.")
            elif m:
                rows.append((f"{prefix}{m[1]}", str(getattr(cls(), m[1])), m[3] or ""))

    walk(Config, "")
    return rows


def reference() -> str:
    """Markdown table of every key, default and comment (`python config.py`; README embeds it)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{key}` | `{default}` | {comment.replace('|', chr(92) + '|')} |"
             for key, default, comment in reference_rows()]
    return "\n".join(rows)


def help_text() -> str:
    """Every key with its default, for the --help of the scripts that take overrides."""
    rows = reference_rows()
    width = max(len(f"{k}={d}") for k, d, _ in rows)
    return "config keys (key=default), set in the YAML or as key=value overrides:\n" + "\n".join(
        f"  {f'{k}={d}':<{width}}  {c}" for k, d, c in rows)


if __name__ == "__main__":
    print(reference())
