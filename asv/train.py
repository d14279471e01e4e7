"""The pieces train_asv.py's loop is made of, and the benchmarks time: the accelerator, the parts
(models, head, optimizer), the training step, schedules, train state, the guard against non-finite
steps, the log meter, trackers and the label encoder."""
from __future__ import annotations

import difflib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, LoggerType, ProjectConfiguration

from .audio import progress
from .augment import spec_augment
from .config import ConfigError, LossConfig, OptimConfig, SchedulerConfig
from .embed import build_models
from .models import build_head
from .run import write_json, write_text


def lr_at(step: int, peak: float, s: SchedulerConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): a pure function of the step."""
    if step < s.warmup_steps:
        return peak * (step + 1) / s.warmup_steps
    progress = min(1.0, (step - s.warmup_steps) / max(1, total_steps - s.warmup_steps))
    r = s.final_lr_ratio
    if s.name == "linear":
        return peak * (1 - (1 - r) * progress)
    if s.name == "cosine":
        return peak * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress)))
    if s.name == "exponential":
        return peak * r ** progress
    return peak


def margin_at(step: int, loss: LossConfig) -> float:
    """Margin for optimizer step `step`: 0, then a linear warm-up to loss.margin (pure function of the step)."""
    if loss.margin_warmup_steps <= 0:
        return loss.margin
    return loss.margin * min(1.0, max(0.0, (step - loss.margin_warmup_start) / loss.margin_warmup_steps))


def make_optimizer(o: OptimConfig, params):
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True)


@dataclass
class TrainState:
    """Where training stands; saved as train_state.json in each checkpoint (JSON, never a pickle: nothing a
    resume reads can run code)."""
    step: int = 0            # optimizer steps done
    micro_batches: int = 0   # batches drawn from the loader (skip_first_batches on resume)
    skipped_steps: int = 0   # updates skipped for a non-finite loss or gradient
    processes: int = 0       # processes that trained up to this step (0: unknown, a checkpoint of an earlier version)

    FILE = "train_state.json"

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict):
        for key, value in state.items():
            setattr(self, key, int(value))

    def save(self, folder: Path):
        write_json(Path(folder) / self.FILE, self.state_dict())

    def load(self, folder: Path):
        """Read folder/train_state.json; anything but the three counters as non-negative integers is one line."""
        path = Path(folder) / self.FILE
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{path}: missing (a checkpoint train_asv.py wrote holds it)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable ({' '.join(str(e).split())})") from None
        fields = set(self.state_dict()) - {"processes"}  # the counters; processes is absent before this version
        if (not isinstance(state, dict) or not fields <= set(state) <= fields | {"processes"}
                or not all(type(v) is int and v >= 0 for v in state.values())):
            raise ValueError(f"{path}: not a train state (expected the non-negative integers "
                             f"{', '.join(sorted(fields))})")
        self.load_state_dict(state)


class NonFiniteGuard:
    """Skipping a step whose loss or gradient is not finite.

    The optimizer update is skipped by the loop; BatchNorm running statistics, however, change in
    every forward pass: `rollback` puts back those of the last good step (else one NaN batch
    poisons evaluation for good), `commit` makes the current ones the good ones. Too many bad
    steps in a row stop the run.
    """

    def __init__(self, modules, max_in_row: int = 20):
        self.buffers = [b for m in modules for b in m.buffers()]
        self.good = [b.clone() for b in self.buffers]
        self.max_in_row, self.in_row = max_in_row, 0

    def commit(self):
        self.in_row = 0
        for b, good in zip(self.buffers, self.good):
            good.copy_(b)

    def rollback(self, step: int, last_checkpoint: str):
        self.in_row += 1
        for b, good in zip(self.buffers, self.good):
            b.copy_(good)
        if self.in_row >= self.max_in_row:
            raise ValueError(f"{self.in_row} optimizer steps in a row had a non-finite loss or gradient, up to step "
                             f"{step}; stopped (last good checkpoint: {last_checkpoint}); check the training audio or "
                             "try a lower optim.lr")


class StepMeter:
    """Loss and accuracy since the last log line, over kept steps only: a skipped step's values never show."""

    def __init__(self, device):
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device)
        self.pending, self.micro, self.crops = [], 0, 0

    def add(self, loss, logits, labels):
        self.pending.append((loss.detach(), (logits.argmax(1) == labels).sum(), labels.numel()))

    def commit(self):
        for loss, correct, crops in self.pending:
            self.loss += loss
            self.correct += correct
            self.micro += 1
            self.crops += crops
        self.pending.clear()

    def drop(self):
        self.pending.clear()

    def read(self, accelerator) -> tuple[float, float]:
        """(mean loss, accuracy) over every process, then reset. micro and crops are equal on every
        process: a step is skipped everywhere or nowhere."""
        loss = accelerator.reduce(self.loss, "mean").item() / self.micro if self.micro else math.nan
        acc = (accelerator.reduce(self.correct, "sum").item() / (self.crops * accelerator.num_processes)
               if self.crops else math.nan)
        self.loss.zero_()
        self.correct.zero_()
        self.micro = self.crops = 0
        return loss, acc


def trackers(log_with: str):
    """train.log_with -> Accelerator(log_with=...): a list of tracker names, "all", or None."""
    names = [n.strip() for n in log_with.split(",") if n.strip() and n.strip() != "none"]
    known = [t.value for t in LoggerType]
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"choose from {', '.join(known)} or none"
            raise ConfigError(f"train.log_with: unknown tracker '{name}' ({hint})")
    return "all" if names == ["all"] else names or None


def label_encoder(exp: Path, speakers: list[str]) -> dict[str, int]:
    """Stage 1: training speakers -> labels, kept as exp/speakers.txt (line i = label i)."""
    speakers = sorted(set(speakers))
    path = exp / "speakers.txt"
    if path.exists():  # a resumed run must keep its labels
        if path.read_text().split() != speakers:
            raise ValueError(f"{path}: the run's speakers differ from data.dir's training speakers; "
                             "use a new exp_dir for new data")
    else:
        write_text(path, "".join(f"{s}\n" for s in speakers))
    return {s: i for i, s in enumerate(speakers)}


def rate(per_second: float) -> str:
    """A throughput as a log line prints it: a decimal below 10 (3.4 crops/s on a laptop, not 3), none above."""
    return f"{per_second:.1f}" if per_second < 10 else f"{per_second:.0f}"


def check_launch(accelerator):
    """Several processes that Accelerate does not see as one run would each train alone, all as the main
    process: `accelerate launch --multi_gpu` on a machine without GPUs does that.

    Under torchrun's agent (which `accelerate launch` runs) the refusal is one line from local rank 0, and that
    process stops the agent: a worker that exits non-zero makes the agent SIGTERM the others and print 40 lines
    of ChildFailedError traceback after the line; SIGTERM or SIGINT make it print a SignalException traceback."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched == accelerator.num_processes:
        return
    line = (f"{launched} processes were started but Accelerate runs them as {accelerator.num_processes} independent "
            "ones (no GPUs and no CPU backend asked for); on a CPU-only machine launch with "
            "ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N <script> ...")
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # not torchrun's worker: the verb prints the line
        raise ValueError(line)
    if torch.distributed.is_initialized():  # Accelerate joined a process group first: wait until every worker
        try:  # is through it, or one still joining when the agent dies prints a "Connection reset" traceback
            torch.distributed.monitored_barrier(timeout=timedelta(seconds=60))
        except RuntimeError:  # a worker that never arrives is stopped with the agent all the same
            pass
    agent = os.getppid()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"error: {line}", file=sys.stderr, flush=True)
        os.kill(agent, signal.SIGKILL)  # the one signal it cannot answer with a traceback
    else:  # exiting before local rank 0 has stopped the agent would let it print the traceback
        deadline = time.monotonic() + 30
        while os.getppid() == agent and time.monotonic() < deadline:
            time.sleep(0.05)
    sys.exit(1)


def one_line(error: Exception) -> str:
    """An error's message on one line. An error raised in a DataLoader worker comes back as
    "Caught AudioError in DataLoader worker process 0. Original Traceback ...": keep its last line."""
    text = str(error).strip()
    if text.startswith("Caught ") and "Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]  # "asv.audio.AudioError: <path>: <problem>"
    return " ".join(text.split())


class Log:
    """Log lines on the terminal (above the progress bar) and in exp/train.log, main process only."""

    def __init__(self, accelerator, exp: Path, total_steps: int, done: int):
        self.main, self.path = accelerator.is_main_process, exp / "train.log"
        self.bar = progress(total=total_steps, desc="training", unit="step", enabled=self.main)
        self.bar.update(done)

    def say(self, line: str):
        if self.main:
            self.bar.write(line)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")


def global_batch(cfg, processes: int) -> int:
    """Utterances per optimizer step: data.batch_size per process x train.gradient_accumulate x processes.
    It grows with the process count: SUPERB's 10 x 5 = 50 on one GPU is 400 on eight (docs/training.md)."""
    return cfg.data.batch_size * cfg.train.gradient_accumulate * processes


def set_backends(t):
    """train.tf32 and train.deterministic, before any model is built or any CUDA kernel runs (cuBLAS reads
    CUBLAS_WORKSPACE_CONFIG when it first starts). Both leave CPU arithmetic as it is.

    TF32 runs fp32 matmuls and convolutions on tensor cores with a 10-bit mantissa (about 1e-3 relative
    per product): base.yaml trains in fp32, and without it every WavLM matmul on an H100 is full fp32.
    Deterministic: every op picks a deterministic kernel (or raises, naming the op, when CUDA has none),
    cuBLAS a fixed workspace, cuDNN no autotuning; without it atomics in scatter/index backward and cuDNN's
    chosen algorithms can make two CUDA runs of the same seed differ in the last bits, then more."""
    # the flags every torch >= 2.6 knows; they leave the CPU's (oneDNN's) fp32 precision alone
    torch.backends.cuda.matmul.allow_tf32 = t.tf32
    torch.backends.cudnn.allow_tf32 = t.tf32
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(t.deterministic)
    torch.backends.cudnn.deterministic = t.deterministic
    torch.backends.cudnn.benchmark = False  # autotuning picks kernels by timing: run-to-run differences


def make_accelerator(cfg, exp: Path | None = None) -> Accelerator:
    """The Accelerator a run trains with (train_asv.py and the benchmarks): precision, accumulation,
    trackers writing into exp/logs; refuses a launch Accelerate would split into independent runs."""
    t = cfg.train
    set_backends(t)
    wanted = trackers(t.log_with) if exp else None
    project = ProjectConfiguration(project_dir=str(exp), logging_dir=str(exp / "logs")) if exp else None
    accelerator = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.gradient_accumulate,
                              log_with=wanted, project_config=project,  # TensorBoard: exp/logs/<run name>/
                              # prepared loaders copy (pinned) batches to the device without waiting for it
                              dataloader_config=DataLoaderConfiguration(non_blocking=True))
    check_launch(accelerator)
    # Accelerate drops a tracker whose package is missing with only a debug message: say it instead
    missing = [n for n in (wanted if isinstance(wanted, list) else []) if n not in {str(x) for x in accelerator.log_with}]
    if missing:
        raise ConfigError(f"train.log_with: {missing[0]} is not installed (pip install {missing[0]}, "
                          "or leave it out of train.log_with)")
    return accelerator


@dataclass
class Parts:
    """What a training step works on. After `prepare`, the modules that learn are Accelerate's wrappers."""
    upstream: torch.nn.Module
    encoder: torch.nn.Module
    head: torch.nn.Module
    trained: list                # the modules that learn: encoder, head (and a trainable upstream)
    params: list
    optimizer: torch.optim.Optimizer
    spec_rng: torch.Generator    # SpecAugment's own: the global RNG also feeds DataLoader iterators
    trainable_upstream: bool
    upstream_learns: bool = False  # this step: trainable and past upstream.freeze_steps (set_schedules sets it)


def build_parts(cfg, num_classes: int) -> Parts:
    """Upstream, encoder (sized from the upstream), margin head, optimizer: the same for training and benchmarks."""
    upstream, encoder = build_models(cfg)
    spec_rng = torch.Generator()
    if cfg.augment.specaug_prob > 0:
        encoder.feature_augment = lambda feats, lengths: spec_augment(feats, lengths, cfg.augment, spec_rng)
    head = build_head(cfg.downstream.embed_dim, num_classes, cfg.loss)
    trained = [encoder, head] + ([upstream] if cfg.upstream.trainable else [])
    groups = param_groups(cfg, encoder, head, upstream)
    params = [p for g in groups for p in g["params"]]
    return Parts(upstream, encoder, head, trained, params, make_optimizer(cfg.optim, groups), spec_rng,
                 cfg.upstream.trainable, cfg.upstream.trainable and cfg.upstream.freeze_steps == 0)  # step 0's stage


def param_groups(cfg, encoder, head, upstream) -> list[dict]:
    """Optimizer groups, each with its `lr_ratio` to the schedule's lr (set_schedules keeps it): the downstream
    and head at 1; a trainable SSL upstream at optim.upstream_lr_ratio, its layers decayed from the top
    (layer i of n: layer_decay^(n - i); the transformer input's group counts as layer 0)."""
    groups = [{"name": "downstream", "params": [p for m in (encoder, head) for p in m.parameters()], "lr_ratio": 1.0}]
    if cfg.upstream.trainable and hasattr(upstream, "layer_groups"):
        layers = upstream.layer_groups()
        top = len(layers) - 1
        for i, params in enumerate(layers):
            ratio = cfg.optim.upstream_lr_ratio * cfg.optim.layer_decay ** (top - i)
            groups.append({"name": f"upstream.{i}", "params": params, "lr_ratio": ratio})
    for g in groups:
        g["lr"] = cfg.optim.lr * g["lr_ratio"]
    return [g for g in groups if g["params"]]


def prepare(accelerator, parts: Parts, *loaders):
    """One `accelerator.prepare` of what learns, the optimizer and the loaders; a frozen upstream stays
    outside it (no DDP, no optimizer, not saved) and is only moved to the device."""
    prepared = accelerator.prepare(*parts.trained, parts.optimizer, *loaders)
    n = len(parts.trained)
    trained, parts.optimizer, loaders = list(prepared[:n]), prepared[n], prepared[n + 1:]
    parts.trained, parts.encoder, parts.head = trained, trained[0], trained[1]
    parts.upstream = trained[2] if parts.trainable_upstream else parts.upstream.to(accelerator.device)
    return loaders


# ---------------------------------------------------------------------------- a lean resume state

FROZEN_FILE = "frozen_weights.json"  # in each step-N: the fingerprint of the weights its Accelerate state leaves out


def frozen(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(state-dict name, tensor) of the parameters that never learn: no optimizer holds them, so a run never
    changes them (a fine-tuned upstream's CNN and the layers above the selection, LoRA's base weights)."""
    return [(n, p) for n, p in module.named_parameters() if not p.requires_grad]


def drops_frozen(cfg) -> bool:
    """A checkpoint's Accelerate state leaves the frozen parameters of what learns out when the run rebuilds them
    (upstream.ckpt, the bundle or the random-init seed). A run started from train.init_from took them from that
    file, which a resume does not read: its state keeps them."""
    return not cfg.train.init_from


def register_lean_state(accelerator, cfg):
    """save_state writes every prepared module's state dict; this drops their frozen parameters from it (a LoRA
    run's state holds its adapters, not a copy of the upstream). A frozen upstream is never prepared, so never
    saved. frozen_fingerprint records what was left out; check_resume refuses a resume that would differ."""
    if not drops_frozen(cfg):
        return

    def drop(models, weights, output_dir):
        for model, state in zip(models, weights):  # the prepared (wrapped) modules: names as in their state dicts
            for name, _ in frozen(model):
                state.pop(name, None)

    accelerator.register_save_state_pre_hook(drop)


def frozen_fingerprint(accelerator, cfg, encoder, head, upstream) -> dict:
    """sha256 over the name, dtype, shape and bytes of every parameter a checkpoint relies on but its Accelerate
    state does not hold: the frozen upstream's (never prepared), and the frozen ones of what learns (dropped by
    register_lean_state). Names are the unwrapped modules', so the process count does not change it."""
    import hashlib

    prepared = {"encoder": True, "head": True, "upstream": bool(cfg.upstream.trainable)}
    digest, tensors, numel = hashlib.sha256(), 0, 0
    for role, module in (("encoder", encoder), ("head", head), ("upstream", upstream)):
        if prepared[role] and not drops_frozen(cfg):
            continue  # kept in the state: not the fingerprint's business
        for name, p in frozen(accelerator.unwrap_model(module)):
            data = p.detach().cpu().contiguous()
            digest.update(f"{role}.{name} {data.dtype} {tuple(data.shape)}\n".encode())
            digest.update(data.view(-1).view(torch.uint8).numpy().tobytes())
            tensors, numel = tensors + 1, numel + data.numel()
    return {"sha256": digest.hexdigest(), "tensors": tensors, "numel": numel}


def check_resume(accelerator, cfg, parts: Parts, folder: Path) -> bool:
    """Before load_state: whether the folder's state leaves frozen parameters out (then it is loaded with
    strict=False). Refused in one line: frozen weights this run rebuilds differently from those the checkpoint
    trained with, or a state that lacks anything but frozen parameters (strict=False must not hide it)."""
    import json

    from safetensors import safe_open

    path = Path(folder) / FROZEN_FILE
    if not path.is_file():
        return False  # an earlier version's checkpoint: its state is whole
    try:
        recorded = json.loads(path.read_text())
        assert isinstance(recorded, dict)
    except (OSError, ValueError, AssertionError):
        raise ValueError(f"{path}: unreadable (not the JSON object train_asv.py writes)") from None
    found = frozen_fingerprint(accelerator, cfg, parts.encoder, parts.head, parts.upstream)
    if found["sha256"] != recorded.get("sha256"):
        raise ValueError(f"{path}: the {recorded.get('tensors')} frozen weights this checkpoint trained with differ "
                         f"from the ones this run rebuilds ({found['tensors']}; upstream.ckpt, the bundle or the "
                         "random-init seed changed?): resuming would not continue that run")
    for i, model in enumerate(parts.trained):  # Accelerate's model{,_1,_2}.safetensors, in prepare's order
        file = Path(folder) / f"model{f'_{i}' if i else ''}.safetensors"
        if not file.is_file():
            continue  # Accelerate names what is missing itself
        bare = lambda names: {n.removeprefix("module.") for n in names}  # DDP's prefix: a resume on another count
        with safe_open(str(file), "pt") as f:
            missing = bare(model.state_dict()) - bare(f.keys()) - bare(name for name, _ in frozen(model))
        if missing:
            raise ValueError(f"{file}: has no {sorted(missing)[0]} ({len(missing)} tensors missing that are not frozen)")
    return True


def train_step(accelerator, parts: Parts, wavs, lengths, labels, clip: float):
    """One micro-batch: forward, backward and, when the gradients are complete, clip and step.
    Returns (loss, logits, finite); `finite` is False when the step's loss or gradient norm is not
    finite: then no update was made (the caller puts back BatchNorm statistics: NonFiniteGuard)."""
    if parts.trainable_upstream:  # staged: in its frozen stage it runs as a frozen upstream does (eval mode)
        parts.upstream.train(parts.upstream_learns)
    with accelerator.accumulate(*parts.trained):
        # a frozen upstream is not prepared, so Accelerate's autocast must be asked for explicitly. Without
        # gradients DDP does not wait for the upstream's: its frozen stage is a plain forward
        with accelerator.autocast(), torch.set_grad_enabled(parts.upstream_learns):
            hidden, frames = parts.upstream(wavs, lengths)  # frozen: no activations kept for backward
        loss, logits = parts.head(parts.encoder(hidden, frames), labels)
        accelerator.backward(loss)
        finite = True
        if accelerator.sync_gradients:  # gradients are complete (and all-reduced) only now
            norm = accelerator.clip_grad_norm_(parts.params, clip or math.inf)
            finite = bool(torch.isfinite(norm))  # one sync per optimizer step; identical on every process
        if finite or accelerator.scaler is not None:  # fp16: the grad scaler skips it and lowers its scale
            parts.optimizer.step()
        parts.optimizer.zero_grad()
    return loss, logits, finite


def set_schedules(accelerator, cfg, parts: Parts, step: int):
    """The lr, the margin and whether the upstream learns at optimizer step `step`: pure functions of the step.
    A staged upstream has no gradient (so the optimizer leaves it and its moments alone) before
    upstream.freeze_steps; a resume anywhere, across the switch too, picks the stage up from the step."""
    parts.upstream_learns = parts.trainable_upstream and step >= cfg.upstream.freeze_steps
    lr = lr_at(step, cfg.optim.lr, cfg.scheduler, cfg.train.total_steps)
    for group in parts.optimizer.param_groups:
        group["lr"] = lr * group["lr_ratio"]  # each group's own share of the schedule (param_groups)
    accelerator.unwrap_model(parts.head).margin = margin_at(step, cfg.loss)
