"""Strict configuration: one dataclass per section, YAML on top, dotted overrides last.

    cfg = load_config("configs/base.yaml", ["train.total_steps=200", "optim.lr=1e-3"])

Every default lives here once, with a comment; the defaults are SUPERB's ASV recipe
(configs/base.yaml spells it out). Unknown keys, wrong types and values that cannot be
meant raise ConfigError naming the key, so a typo never trains the wrong model silently.
The downstream section belongs to the chosen architecture: `downstream.name` picks a row of
models.DOWNSTREAMS and its other keys are that architecture's own (see its `Options`).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field

import yaml

from .models import DOWNSTREAMS, LOSSES, POOLINGS
from .models.options import key
from .models.upstream import FEATURES, UPSTREAMS


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    dir: str = key("data/demo", "a prepare_voxceleb.py output folder")
    sample_rate: int = key(16000, "model rate; files at other rates are resampled on load")
    shards: str = key("", "read audio from a shard store (prepare_voxceleb.py --shards): its folder or URL; "
                      "empty: the files the manifest names. The same samples either way")
    effects: str = key("superb", "training audio: superb (gain -3 dB + SoX silence trimming, as s3prl) | none")
    crop: str = key("superb",
                    "superb: whole utterances, longer than max_secs cropped to it, batches padded | fixed: one "
                    "length per batch in [min_secs, max_secs], short files tiled")
    min_secs: float = key(2.0,
                          "superb: drop training utterances of at most this (after effects) | fixed: shortest crop")
    max_secs: float = key(8.0, "superb: random crop of longer utterances | fixed: longest crop")
    batch_size: int = key(10, "utterances per batch per process (SUPERB: 10)")
    eval_batch_secs: float = key(0.0,
                                 "audio seconds per evaluation batch, length-sorted; 0: the fastest for the device "
                                 "(CPU: 60, one utterance per batch with an SSL upstream; GPU: 600). Embeddings do not depend on it")
    eval_chunk_secs: float = key(0.0,
                                 ">0: upstream on windows this long at evaluation: memory bounded by it, not the "
                                 "longest file")


@dataclass
class UpstreamConfig:
    name: str = key("wavlm_base_plus", "a row of models.upstream.UPSTREAMS: " + " | ".join(UPSTREAMS)
                    + " (fbank, mfcc: s3prl's Kaldi features; logmel: batched)")
    ckpt: str = key("",
                    "SSL weights on disk: torchaudio .pth, Hugging Face folder, fairseq/WavLM/s3prl .pt; empty: "
                    "torchaudio bundle (hub cache)")
    random_init: bool = key(False, "SSL: build the architecture with random weights (tests, benchmarks, no hub)")
    arch: dict = key({}, "SSL: architecture overrides for random_init, e.g. {encoder_num_layers: 2}")
    trainable: bool = key(False, "fine-tune the upstream (SUPERB: frozen); an SSL model's CNN stays frozen")
    lora_rank: int = key(0,
                         "trainable SSL: LoRA adapters (peft) of this rank instead of the full weights (0: off); "
                         "model.pt holds the adapters")
    lora_alpha: float = key(16.0, "LoRA scaling numerator (peft's lora_alpha; the update is scaled by alpha / rank)")
    grad_checkpointing: bool = key(False,
                                   "trainable SSL: recompute each transformer layer in backward (memory for time)")
    freeze_steps: int = key(0,
                            "trainable SSL: frozen for the first N optimizer steps, then joint (WeSpeaker's frozen "
                            "-> joint_ft)")
    padded_group_norm: bool = key(False,
                                  "Base SSL models: first conv's group norm over the padded batch, as s3prl (false: "
                                  "each utterance's own samples, batch-invariant)")
    n_mels: int = key(80, "fbank, logmel: mel bands (s3prl's fbank: 80)")
    n_mfcc: int = key(13, "mfcc: cepstra (s3prl's mfcc: 13)")


@dataclass
class FeaturizerConfig:
    layer_selections: list = key([],
                                 "upstream layers to weigh (0 = CNN/transformer input); []: all. The upstream stops "
                                 "at the deepest")
    normalize: bool = key(False, "layer-norm each layer before the weighted sum (SUPERB: false)")


@dataclass
class LossConfig:
    name: str = key("amsoftmax",
                    "a row of models.LOSSES: amsoftmax (cos - m, SUPERB) | aamsoftmax (cos(theta + m), ArcFace)")
    margin: float = key(0.4, "SUPERB AM-softmax: 0.4")
    scale: float = key(30.0, "SUPERB AM-softmax: 30")
    sub_centers: int = key(1, ">1: sub-centre AM/AAM-softmax (K centres per speaker, robust to label noise)")
    margin_warmup_start: int = key(0, "margin is 0 until this optimizer step...")
    margin_warmup_steps: int = key(0,
                                   "...then rises linearly to loss.margin over this many steps (0: full margin at "
                                   "once)")


@dataclass
class OptimConfig:
    name: str = key("adamw", "adamw | adam | sgd")
    lr: float = key(1e-4, "peak learning rate (SUPERB: 1e-4)")
    weight_decay: float = key(0.01, "decoupled for adamw, L2 otherwise (SUPERB: torch's AdamW default, 0.01)")
    momentum: float = key(0.9, "sgd only")
    upstream_lr_ratio: float = key(1.0, "a trainable SSL upstream's lr as a fraction of optim.lr (e.g. 0.1)")
    layer_decay: float = key(1.0,
                             "layer-wise lr decay: transformer layer i of a trainable upstream (of n run) gets "
                             "decay^(n-i) (1.0: none)")


@dataclass
class SchedulerConfig:
    name: str = key("constant", "constant | linear | cosine | exponential (after warm-up)")
    warmup_steps: int = key(0, "linear warm-up from 0 over this many optimizer steps")
    final_lr_ratio: float = key(0.01, "lr at the last step as a fraction of optim.lr (linear, cosine, exponential)")


@dataclass
class AugmentConfig:
    noise_dir: str = key("", "MUSAN-style folder: noise/, music/, speech/ subfolders of wav/flac (empty: off)")
    noise_prob: float = key(0.0, "probability a crop gets additive noise (one of noise, music, babble)")
    noise_snr_min: float = key(0.0, "noise/: SNR range in dB (Kaldi/WeSpeaker: 0-15)")
    noise_snr_max: float = 15.0
    music_snr_min: float = key(5.0, "music/: SNR range in dB (5-15)")
    music_snr_max: float = 15.0
    babble_snr_min: float = key(13.0, "babble from speech/: SNR range in dB (13-20)")
    babble_snr_max: float = 20.0
    babble_speakers_min: int = key(3, "babble: speech segments summed (3-7)")
    babble_speakers_max: int = 7
    rir_dir: str = key("", "folder of room impulse responses (wav/flac, any depth) (empty: off)")
    rir_prob: float = key(0.0, "probability a crop is reverberated (before the noise is added)")
    speed_prob: float = key(0.0, "probability of speed perturbation 0.9 or 1.1 (each factor a new speaker)")
    specaug_prob: float = key(0.0, "probability an utterance's upstream features get SpecAugment masks")
    specaug_time_masks: int = key(1, "time masks per utterance")
    specaug_time_width: int = key(10, "widest time mask in frames (width drawn from 1..this)")
    specaug_freq_masks: int = key(1, "frequency masks per utterance")
    specaug_freq_width: int = key(8, "widest frequency mask in bins (width drawn from 1..this)")


@dataclass
class ScoreConfig:
    asnorm: bool = key(False, "also write adaptive s-norm scores (scores_asnorm.txt, metrics_asnorm.json)")
    cohort_size: int = key(1000, "training utterances in the AS-norm (and QMF imposter-mean) cohort (spread over "
                                 "speakers)")
    top_k: int = key(300, "closest cohort members per side")
    calibration: str = key("plain",
                           "plain: score -> LLR | qmf: also the plain one's quality-measure twin (log enrolment/test"
                           " durations, imposter means; the set chosen on held-out validation speakers), both fit"
                           " on validation trials, both reported")


@dataclass
class TrainConfig:
    total_steps: int = key(200000, "optimizer steps (SUPERB: 200k)")
    log_step: int = key(500, "print/log loss, accuracy, lr and speed every N steps")
    eval_step: int = key(10000, "validation on the held-out validation speakers every N steps (SUPERB: none)")
    save_step: int = key(10000, "checkpoint every N steps (and whenever validation improves)")
    keep_num_ckpts: int = key(0, "keep the newest N step-* folders (0: all, as SUPERB); the best is never deleted")
    gradient_clipping: float = key(1000.0, "max global grad norm (SUPERB: 1e3, in effect none; 0: off)")
    gradient_accumulate: int = key(5, "micro-batches per optimizer step (SUPERB: 5)")
    mixed_precision: str = key("no", "no | fp16 | bf16 (via Accelerate)")
    tf32: bool = key(True, "CUDA: TF32 tensor cores for fp32 matmuls and convolutions (Ampere or newer)")
    deterministic: bool = key(False,
                              "torch deterministic algorithms, cuDNN without autotuning: bit-repeatable CUDA runs, "
                              "slower (docs/training.md)")
    seed: int = key(0, "model init, sample order, crops: the same seed gives the same run (SUPERB: 0)")
    auto_resume: bool = key(True, "re-running the same command resumes from the newest complete checkpoint")
    resume_ckpt_dir: str = key("", "resume from this step-* folder instead")
    init_from: str = key("", "a model.pt to start from (weights only, new optimizer): large-margin fine-tuning")
    valid_metric: str = key("eer", "eer | min_dcf_0.01 | min_dcf_0.05: selects exp/<run>/best (ties: see asv/run.py)")
    test_after_train: bool = key(True, "evaluate the best checkpoint on the test trial lists at the end")
    log_with: str = key("tensorboard",
                        "Accelerate trackers, comma-separated: tensorboard | wandb | comet_ml | mlflow | all | none")


def downstream_options(name: str):
    """The default options of downstream `name` (a dataclass with `name` and the architecture's keys)."""
    if name not in DOWNSTREAMS:
        raise ConfigError(f"config key 'downstream.name' must be one of {', '.join(DOWNSTREAMS)}, got {name!r}")
    return DOWNSTREAMS[name].Options()


@dataclass
class Config:
    exp_dir: str = key("exp/run", "the run folder: config, labels, step-*/ checkpoints, logs")
    num_workers: int = key(-1, "data loader worker processes per process; -1: fit the machine (the CPUs this "
                                "process may use / processes on the node - 1, at most 8; asv.data.loader_workers)")
    eval_batch: int = key(-1, "cap validation/evaluation to N batches (-1: all; quick checks only)")
    data: DataConfig = field(default_factory=DataConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    featurizer: FeaturizerConfig = field(default_factory=FeaturizerConfig)
    downstream: typing.Any = field(default_factory=lambda: downstream_options("superb_xvector"))  # see models.DOWNSTREAMS
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = (DataConfig, UpstreamConfig, FeaturizerConfig, LossConfig, OptimConfig, SchedulerConfig, AugmentConfig,
            ScoreConfig, TrainConfig)
CHOICES = {  # string keys with a closed set of values (upstream.name: models.upstream.build_upstream owns the list)
    "data.effects": ("superb", "none"),
    "data.crop": ("superb", "fixed"),
    "score.calibration": ("plain", "qmf"),
    "loss.name": tuple(LOSSES),  # models.LOSSES: a new margin loss is a row there, not here
    "optim.name": ("adamw", "adam", "sgd"),
    "scheduler.name": ("constant", "linear", "cosine", "exponential"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.valid_metric": ("eer", "min_dcf_0.01", "min_dcf_0.05"),
}
UPSTREAM_KEYS = {  # upstream keys that only some upstreams read: name -> does it apply to upstream `name`
    "n_mels": lambda name: name in ("fbank", "logmel"),
    "n_mfcc": lambda name: name == "mfcc",
    "ckpt": lambda name: name not in FEATURES,
    "random_init": lambda name: name not in FEATURES,
    "arch": lambda name: name not in FEATURES,
}
AT_LEAST_ONE = ("data.batch_size", "data.sample_rate", "train.total_steps", "train.log_step", "train.eval_step",
                "train.save_step", "train.gradient_accumulate", "loss.sub_centers", "score.cohort_size", "score.top_k")
NOT_NEGATIVE = ("upstream.freeze_steps", "upstream.lora_rank", "data.min_secs", "data.eval_batch_secs", "data.eval_chunk_secs", "train.keep_num_ckpts",
                "train.seed", "train.gradient_clipping", "optim.weight_decay", "scheduler.warmup_steps",
                "scheduler.final_lr_ratio", "loss.margin_warmup_start", "loss.margin_warmup_steps")
POSITIVE = ("data.max_secs", "optim.lr", "loss.scale")
# What a re-run may change in an existing run folder without being refused: nothing here alters
# what the trained weights are (train.total_steps only while the lr schedule ignores it; data.shards holds the
# very bytes of the files: the same examples)
SAFE_TO_CHANGE = ("exp_dir", "num_workers", "eval_batch", "data.shards", "data.eval_batch_secs", "data.eval_chunk_secs",
                  "score.",
                  "train.total_steps", "train.log_step", "train.eval_step", "train.save_step", "train.keep_num_ckpts",
                  "train.auto_resume", "train.resume_ckpt_dir", "train.test_after_train", "train.log_with")


def _coerce(value, typ, key):
    """Check one value against its declared type; ints are accepted where floats are expected."""
    if key == "train.mixed_precision" and value is False:  # YAML 1.1 reads Accelerate's `no` as false
        return "no"
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    typ = typing.get_origin(typ) or typ
    if isinstance(value, bool) and typ is str:
        raise ConfigError(f"config key '{key}' must be a string, got the YAML boolean {value} "
                          "(YAML reads yes/no/on/off as booleans: quote it)")
    if not isinstance(value, typ) or (typ in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' must be {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


REMOVED = {  # keys of older configs: loading one says what replaces it
    "train.use_scheduler": "the scheduler section always applies; scheduler.name=constant is a constant optim.lr",
    "train.valid_higher_better": "every train.valid_metric is an error rate or a cost: lower is always better",
}


def _merge(obj, updates: dict, prefix: str = "", owner: str = ""):
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for part, value in updates.items():
        full = prefix + str(part)
        if full in REMOVED:
            raise ConfigError(f"config key '{full}' was removed: {REMOVED[full]}; delete it from the config")
        if part not in names:
            close = difflib.get_close_matches(str(part), names, n=1)
            if owner:
                hint = f" (keys of {owner}: {', '.join(n for n in names if n != 'name')})"
                raise ConfigError(f"config key '{full}' does not apply to {owner}{hint}")
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid keys: {', '.join(prefix + n for n in names)})"
            raise ConfigError(f"unknown config key '{full}'{hint}")
        current = getattr(obj, part)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' is a section; set its fields, e.g. {full}.<key>=...")
            if part == "downstream":
                current = _downstream(current, value)
                setattr(obj, part, current)
                continue
            if part == "upstream" and value.get("name", current.name) != current.name:
                for field_name, applies in UPSTREAM_KEYS.items():  # the previous upstream's own keys go
                    if not applies(value["name"]):
                        setattr(current, field_name, getattr(UpstreamConfig(), field_name))
            _merge(current, value, full + ".")
        else:
            value = _coerce(value, hints[part], full)
            allowed = CHOICES.get(full)
            if allowed and value not in allowed:
                raise ConfigError(f"config key '{full}' must be one of {', '.join(allowed)}, got {value!r}")
            setattr(obj, part, value)


def _downstream(current, updates: dict):
    """The downstream section: a new name starts from that architecture's defaults, keeping the values set
    earlier (a YAML, say) for keys it shares with the previous one; the previous one's own keys are dropped.
    Every key given together with, or after, the name must be the chosen architecture's own."""
    name = updates.get("name", current.name)
    if not isinstance(name, str):
        raise ConfigError(f"config key 'downstream.name' must be a string, got {name!r}")
    options = downstream_options(name) if name != current.name else current
    if name != current.name:
        own = {f.name for f in dataclasses.fields(options)} - {"name"}
        carried = {k: v for k, v in dataclasses.asdict(current).items()
                   if k in own and v != getattr(downstream_options(current.name), k)}
        _merge(options, carried, "downstream.", f"downstream.name={name}")
    _merge(options, {k: v for k, v in updates.items() if k != "name"}, "downstream.", f"downstream.name={name}")
    return options


def parse_override(text: str, is_text=None) -> dict:
    """'train.total_steps=200' -> {'train': {'total_steps': 200}} (value parsed as YAML).

    `is_text(dotted)` says whether the key holds a string: then the value is the text as typed (YAML only
    takes off quotes), so exp_dir=off or data.dir=2024-01-01 stay strings, as a command line means them."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    dotted, raw = text.split("=", 1)
    dotted = dotted.strip()
    text_key = is_text is not None and is_text(dotted)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        if not text_key:
            raise ConfigError(f"override '{text}': value is not valid YAML ({str(e).splitlines()[0]})") from None
        value = raw.strip()
    if text_key and not isinstance(value, str):
        value = raw.strip()
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def _is_text_key(cfg: Config, dotted: str) -> bool:
    """Whether `dotted` names a string key of `cfg` as it stands (downstream keys are its architecture's)."""
    *sections, key = dotted.split(".")
    obj = cfg
    for name in sections:
        obj = getattr(obj, name, None)
    if not dataclasses.is_dataclass(obj) or key not in {f.name for f in dataclasses.fields(obj)}:
        return False
    return typing.get_type_hints(type(obj))[key] is str


def _check(cfg: Config):
    """Values that pass the type check but cannot be meant."""
    flat = flatten(cfg)
    for dotted in AT_LEAST_ONE:
        if flat[dotted] < 1:
            raise ConfigError(f"config key '{dotted}' must be >= 1, got {flat[dotted]}")
    for dotted in NOT_NEGATIVE:
        if flat[dotted] < 0:
            raise ConfigError(f"config key '{dotted}' must be >= 0, got {flat[dotted]}")
    for dotted in POSITIVE:
        if flat[dotted] <= 0:
            raise ConfigError(f"config key '{dotted}' must be > 0, got {flat[dotted]}")
    if cfg.num_workers < -1:
        raise ConfigError(f"config key 'num_workers' must be -1 (fit the machine) or >= 0, got {cfg.num_workers}")
    if cfg.eval_batch == 0 or cfg.eval_batch < -1:
        raise ConfigError(f"config key 'eval_batch' must be -1 (all) or >= 1, got {cfg.eval_batch}")
    for dotted, value in flat.items():
        if dotted.startswith("augment.") and dotted.endswith("_prob") and not 0 <= value <= 1:
            raise ConfigError(f"config key '{dotted}' must be a probability in [0, 1], got {value}")
    if cfg.data.min_secs > cfg.data.max_secs:
        raise ConfigError(f"data.min_secs ({cfg.data.min_secs}) must not exceed data.max_secs ({cfg.data.max_secs})")
    if cfg.data.crop == "fixed" and cfg.data.min_secs <= 0:
        raise ConfigError("data.min_secs must be > 0 with data.crop=fixed (it is the shortest crop)")
    pooling = getattr(cfg.downstream, "pooling", None)
    if pooling is not None and pooling not in POOLINGS:
        raise ConfigError(f"config key 'downstream.pooling' must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if cfg.optim.name != "sgd" and cfg.optim.momentum != OptimConfig.momentum:
        raise ConfigError(f"optim.momentum applies to optim.name=sgd only, not {cfg.optim.name}")
    layers = cfg.featurizer.layer_selections
    if any(type(i) is not int or i < 0 for i in layers):
        raise ConfigError(f"featurizer.layer_selections must be layer numbers >= 0, got {layers}")
    cfg.featurizer.layer_selections = sorted(set(layers))  # as s3prl's Featurizer: order and repeats mean nothing
    u = cfg.upstream
    if cfg.optim.upstream_lr_ratio <= 0:  # a frozen upstream is upstream.trainable=false
        raise ConfigError(f"config key 'optim.upstream_lr_ratio' must be > 0, got {cfg.optim.upstream_lr_ratio}")
    if not 0 < cfg.optim.layer_decay <= 1:
        raise ConfigError(f"optim.layer_decay must be in (0, 1] (1.0: no decay), got {cfg.optim.layer_decay}")
    finetune = u.trainable and u.name not in FEATURES
    if u.lora_rank and not finetune:
        raise ConfigError("upstream.lora_rank applies to a trainable SSL upstream only (upstream.trainable=true)")
    if u.lora_alpha != UpstreamConfig.lora_alpha and not u.lora_rank:
        raise ConfigError("upstream.lora_alpha applies with upstream.lora_rank > 0 only")
    if u.lora_alpha <= 0:
        raise ConfigError(f"config key 'upstream.lora_alpha' must be > 0, got {u.lora_alpha}")
    if u.grad_checkpointing and not finetune:
        raise ConfigError("upstream.grad_checkpointing applies to a trainable SSL upstream only (upstream.trainable=true)")
    if u.freeze_steps and not finetune:
        raise ConfigError("upstream.freeze_steps applies to a trainable SSL upstream only (upstream.trainable=true)")
    for dotted in ("upstream_lr_ratio", "layer_decay"):
        if not finetune and getattr(cfg.optim, dotted) != getattr(OptimConfig(), dotted):
            raise ConfigError(f"optim.{dotted} applies to a trainable SSL upstream only (upstream.trainable=true)")
    for dotted, applies in UPSTREAM_KEYS.items():
        if not applies(u.name) and getattr(u, dotted) != getattr(UpstreamConfig(), dotted):
            raise ConfigError(f"upstream.{dotted} does not apply to upstream.name={u.name}")
    if u.name in FEATURES and any(cfg.featurizer.layer_selections):
        raise ConfigError(f"featurizer.layer_selections: upstream {u.name} has a single layer, 0")


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
        _merge(cfg, parse_override(text, lambda dotted: _is_text_key(cfg, dotted)))
    _check(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flatten(cfg: Config) -> dict:
    """{'data.dir': ..., 'upstream.arch': {...}, ...}: every key, dotted."""
    flat = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict) and k != "arch":
                walk(v, f"{prefix}{k}.")
            else:
                flat[prefix + k] = v

    walk(config_to_dict(cfg), "")
    return flat


def config_changes(old: Config, new: Config) -> dict[str, tuple]:
    """{dotted key: (old value, new value)} for every key that differs."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def unsafe_changes(old: Config, new: Config) -> dict[str, tuple]:
    """The changes a run folder must refuse: they would make one run's checkpoints come from two recipes."""
    changes = config_changes(old, new)
    schedule_uses_total = new.scheduler.name != "constant"  # the margin's never does
    return {k: v for k, v in changes.items() if not k.startswith(SAFE_TO_CHANGE)
            or (k == "train.total_steps" and schedule_uses_total)}




def reference_rows() -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every key, from each field's metadata (models.options.key)."""
    rows = []

    def walk(obj, prefix, note=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if note and f.name == "name":
                continue
            if f.name == "downstream" and not prefix:
                rows.append(("downstream.name", value.name, " | ".join(DOWNSTREAMS) + " (models.DOWNSTREAMS); "
                             "the other downstream keys are the chosen architecture's own"))
                for name, model in DOWNSTREAMS.items():
                    walk(model.Options(), "downstream.", f"[{name}] ")
            elif dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                rows.append((f"{prefix}{f.name}", str(value), note + f.metadata.get("help", "")))

    walk(Config(), "")
    return rows


def reference() -> str:
    """Markdown table of every key, default and help (docs/config.md embeds it)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{key}` | `{default}` | {text.replace('|', chr(92) + '|')} |" for key, default, text in reference_rows()]
    return "\n".join(rows)


def help_text() -> str:
    """Every key with its default, for the --help of the scripts that take overrides."""
    rows = reference_rows()
    width = max(len(f"{k}={d}") for k, d, _ in rows)
    return "config keys (key=default), set in the YAML or as key=value overrides:\n" + "\n".join(
        f"  {f'{k}={d}':<{width}}  {c}" for k, d, c in rows)
