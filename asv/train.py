"""The pieces train_asv.py's loop is made of: schedules, optimizer, train state, the guard against
non-finite steps, the log meter, trackers and the label encoder. Each takes the config section it uses.
"""
from __future__ import annotations

import difflib
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate.utils import LoggerType

from .config import ConfigError, LossConfig, OptimConfig, SchedulerConfig
from .run import write_text


def lr_at(step: int, peak: float, scheduler: SchedulerConfig | None, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): a pure function of the step.
    `scheduler` None (train.use_scheduler false): constant."""
    if scheduler is None:
        return peak
    s = scheduler
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
    """Registered with Accelerate, so save_state/load_state carry it with the model and optimizer."""
    step: int = 0            # optimizer steps done
    micro_batches: int = 0   # batches drawn from the loader (skip_first_batches on resume)
    skipped_steps: int = 0   # updates skipped for a non-finite loss or gradient

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict):
        for key, value in state.items():
            setattr(self, key, int(value))


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
    process: `accelerate launch --multi_gpu` on a machine without GPUs does that."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ValueError(f"{launched} processes were started but Accelerate runs them as {accelerator.num_processes} "
                         "independent ones (no GPUs and no CPU backend asked for); on a CPU-only machine launch with "
                         "ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N <script> ...")


def one_line(error: Exception) -> str:
    """An error's message on one line. An error raised in a DataLoader worker comes back as
    "Caught AudioError in DataLoader worker process 0. Original Traceback ...": keep its last line."""
    text = str(error).strip()
    if text.startswith("Caught ") and "Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]  # "asv.audio.AudioError: <path>: <problem>"
    return " ".join(text.split())
