"""Train a speaker-verification model: label encoder (stage 1), then training (stage 2).

    accelerate launch train_asv.py --config configs/base.yaml
    python train_asv.py --config configs/demo.yaml train.total_steps=200 exp_dir=exp/try

Re-running the same command resumes from the newest complete checkpoint in exp_dir.
Checkpoints: exp_dir/step-N/ (Accelerate state + model.pt, the file evaluation loads),
exp_dir/best -> the checkpoint with the best validation metric (validation speakers
only; the test trials never choose anything). At the end the best checkpoint is
evaluated on the test trial lists.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import LoggerType, ProjectConfiguration, set_seed
from safetensors import SafetensorError

import metrics
from augment import Augmenter, spec_augment
from config import ConfigError, config_to_dict, help_text, load_config, save_config
from data import (AudioError, CropBatchSampler, CropDataset, collate_crops, progress, read_manifest, read_trials,
                  trial_lists)
from evaluate_asv import embed, evaluate_checkpoints, make_eval_loader, model_meta, score_list, trial_rows
from models import MarginSoftmax, build_encoder, build_upstream, load_model_file, min_input_samples, save_model_file


MAX_BAD_STEPS_IN_ROW = 20  # non-finite updates skipped in a row before the run stops


def lr_at(step: int, cfg) -> float:
    """Learning rate for optimizer step `step` (0-based): a pure function of the step."""
    peak = cfg.optim.lr
    if not cfg.train.use_scheduler:
        return peak
    s, total = cfg.scheduler, cfg.train.total_steps
    if step < s.warmup_steps:
        return peak * (step + 1) / s.warmup_steps
    progress = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
    r = s.final_lr_ratio
    if s.name == "linear":
        return peak * (1 - (1 - r) * progress)
    if s.name == "cosine":
        return peak * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress)))
    if s.name == "exponential":
        return peak * r ** progress
    return peak


def margin_at(step: int, cfg) -> float:
    """Margin for optimizer step `step`: 0, then a linear warm-up to loss.margin (pure function of the step)."""
    loss = cfg.loss
    if loss.margin_warmup_steps <= 0:
        return loss.margin
    return loss.margin * min(1.0, max(0.0, (step - loss.margin_warmup_start) / loss.margin_warmup_steps))


def make_optimizer(cfg, params):
    o = cfg.optim
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True)


def build_label_encoder(exp: Path, train_utts) -> dict[str, int]:
    """Stage 1: training speakers -> labels, saved as exp/speakers.txt (line i = label i)."""
    speakers = sorted({u.speaker for u in train_utts})
    path = exp / "speakers.txt"
    if path.exists():  # a resumed run must keep its labels
        saved = path.read_text().split()
        if saved != speakers:
            raise ValueError(f"{path}: the run's speakers differ from data.dir's training speakers; "
                             "use a new exp_dir for new data")
    else:
        path.write_text("".join(f"{s}\n" for s in speakers))
    return {s: i for i, s in enumerate(speakers)}


def complete_checkpoints(exp: Path) -> list[Path]:
    """step-N folders with a finished model.pt, oldest first (half-written *.tmp folders never count)."""
    found = [p for p in exp.glob("step-*") if p.name[5:].isdigit() and (p / "model.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def better(value: float, best: float | None, cfg) -> bool:
    if best is None:
        return True
    return value > best if cfg.train.valid_higher_better else value < best


def one_line(error: Exception) -> str:
    """An error's message on one line. An error raised in a DataLoader worker comes back as
    "Caught AudioError in DataLoader worker process 0. Original Traceback ...": keep its last line."""
    text = str(error).strip()
    if text.startswith("Caught ") and "Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]  # "data.AudioError: <path>: <problem>"
    return text


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


def flat_config(cfg) -> dict:
    """{'data.dir': ..., ...}: trackers (TensorBoard hparams) take only scalars and strings."""
    flat = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict) and k != "arch":
                walk(v, f"{prefix}{k}.")
            else:
                flat[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk(config_to_dict(cfg), "")
    return flat


def main():
    parser = argparse.ArgumentParser(description=__doc__, epilog=help_text(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: none, every key at its default below)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.total_steps=200 optim.lr=1e-3")
    args = parser.parse_args()
    try:
        train(load_config(args.config, args.overrides))
    except (ConfigError, ValueError, OSError, AudioError) as e:  # OSError: a full disk, a missing file
        sys.exit(f"error: {one_line(e)}")


def train(cfg):
    t = cfg.train
    exp = Path(cfg.exp_dir)
    wanted = trackers(t.log_with)
    accelerator = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.gradient_accumulate,
                              log_with=wanted,  # TensorBoard: exp_dir/logs/<run name>/
                              project_config=ProjectConfiguration(project_dir=str(exp), logging_dir=str(exp / "logs")))
    # Accelerate drops a tracker whose package is missing with only a debug message: say it instead
    missing = [n for n in (wanted if isinstance(wanted, list) else []) if n not in {str(x) for x in accelerator.log_with}]
    if missing:
        raise ConfigError(f"train.log_with: {missing[0]} is not installed (pip install {missing[0]}, "
                          "or leave it out of train.log_with)")
    set_seed(t.seed)
    main_process = accelerator.is_main_process
    if main_process:
        exp.mkdir(parents=True, exist_ok=True)
        for tmp in exp.glob("step-*.tmp"):  # a save interrupted by a kill: never resumed from
            shutil.rmtree(tmp, ignore_errors=True)
        save_config(cfg, str(exp / "config.yaml"))
    accelerator.wait_for_everyone()
    accelerator.init_trackers(exp.resolve().name, config=flat_config(cfg))

    # ---- stage 1: data and label encoder
    utts = read_manifest(cfg.data.dir)
    train_utts = [u for u in utts if u.split == "train"]
    if not train_utts:
        raise ValueError(f"{cfg.data.dir}/utterances.csv has no training utterances")
    label_of = build_label_encoder(exp, train_utts) if main_process else None
    accelerator.wait_for_everyone()
    if label_of is None:
        label_of = {s: i for i, s in enumerate((exp / "speakers.txt").read_text().split())}
    lists = trial_lists(cfg.data.dir)
    if "valid" not in lists:
        raise ValueError(f"{cfg.data.dir}/trials/valid.txt is missing: prepare_voxceleb.py writes it")
    valid_trials = read_trials(str(lists["valid"]))
    valid_paths = sorted({*valid_trials[1], *valid_trials[2]})
    durations = {u.path: u.duration for u in utts}
    missing = [p for p in valid_paths if p not in durations]
    if missing:
        raise ValueError(f"{lists['valid']}: names {missing[0]}, which is not in the manifest")
    valid_a, valid_b = trial_rows({p: i for i, p in enumerate(valid_paths)}, valid_trials)

    # ---- model: a frozen upstream stays outside `prepare` (no DDP wrapper, no optimizer, not saved)
    upstream = build_upstream(cfg.upstream, cfg.data.sample_rate)
    encoder = build_encoder(cfg, upstream)
    aug = cfg.augment
    # SpecAugment draws from its own generator, reseeded every micro-batch from (seed, position) as the
    # crops are: the global RNG also feeds DataLoader iterators, which a resumed run creates at another point
    spec_rng = torch.Generator()
    if aug.specaug_prob > 0:
        encoder.feature_augment = lambda feats, lengths: spec_augment(feats, lengths, aug, spec_rng)
    augmenter = Augmenter(aug, cfg.data.sample_rate) if aug.noise_prob or aug.rir_prob or aug.speed_prob else None
    num_classes = len(label_of) * (3 if aug.speed_prob > 0 else 1)  # speed-perturbed copies are new speakers
    head = MarginSoftmax(cfg.downstream.embed_dim, num_classes, cfg.loss.name, cfg.loss.margin, cfg.loss.scale,
                         cfg.loss.sub_centers)
    checkpoints = complete_checkpoints(exp)
    if t.init_from and not checkpoints:  # fine-tuning starts from another run's weights
        load_model_file(t.init_from, encoder, upstream, model_meta(cfg), head)
        accelerator.print(f"initialised from {t.init_from}")
    params = [*encoder.parameters(), *head.parameters()]
    if cfg.upstream.trainable:
        params += list(upstream.parameters())
    optimizer = make_optimizer(cfg, params)

    sampler = CropBatchSampler([u.duration for u in train_utts], cfg.data.batch_size, cfg.data.min_secs,
                               cfg.data.max_secs, t.seed, multiple=t.gradient_accumulate * accelerator.num_processes)
    train_set = CropDataset(train_utts, [label_of[u.speaker] for u in train_utts], cfg.data.sample_rate, augmenter)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_crops,
                                         num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
    valid_loader = make_eval_loader(valid_paths, [durations[p] for p in valid_paths], cfg,
                                    min_input_samples(upstream, encoder))
    if cfg.upstream.trainable:
        upstream, encoder, head, optimizer, loader, valid_loader = accelerator.prepare(
            upstream, encoder, head, optimizer, loader, valid_loader)
    else:
        encoder, head, optimizer, loader, valid_loader = accelerator.prepare(encoder, head, optimizer, loader,
                                                                             valid_loader)
        upstream.to(accelerator.device)

    # ---- resume: the newest complete checkpoint (or resume_ckpt_dir)
    state = {"step": 0, "micro_batches": 0, "best_metric": None, "best_step": None, "skipped_steps": 0}
    resume = Path(t.resume_ckpt_dir) if t.resume_ckpt_dir else None
    if resume is None and t.auto_resume and checkpoints:
        resume = checkpoints[-1]
    if resume is not None:
        try:
            accelerator.load_state(str(resume))
        except Exception as e:
            raise ValueError(f"{resume}: cannot resume, checkpoint does not match the config "
                             f"({' '.join(str(e).split())[:200]})") from None
        state = json.loads((resume / "train_state.json").read_text())
        accelerator.print(f"resumed from {resume} at step {state['step']}")

    def set_lr(step: int):  # and the margin: both pure functions of the optimizer step
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        accelerator.unwrap_model(head).margin = margin_at(step, cfg)

    set_lr(state["step"])

    def validate(step: int) -> dict | None:
        (table,), done = embed(accelerator, upstream, [encoder], valid_loader, len(valid_paths), cfg.eval_batch,
                               int(cfg.data.eval_chunk_secs * cfg.data.sample_rate))
        scores, keep = score_list(table, done, valid_a, valid_b)
        bad = np.count_nonzero(~np.isfinite(scores))
        if bad:  # NaN/inf embeddings (a diverged model, a broken validation file): no metric, never the best
            line = f"warning: step {step} validation skipped: {bad} of {len(scores)} trial scores are NaN or inf"
            result = None
        else:
            result = metrics.compute_metrics(scores, valid_trials[0][keep])
            line = (f"step {step} | valid EER {result['eer']:.2f}% | minDCF0.01 {result['min_dcf_0.01']:.4f} "
                    f"| minDCF0.05 {result['min_dcf_0.05']:.4f}")
            accelerator.log({f"valid/{k}": v for k, v in result.items()}, step=step)
        say(line)
        return result

    def save(step: int, valid: dict | None):
        """Write step-N.tmp, then rename: a kill mid-save leaves no half checkpoint behind."""
        final, tmp = exp / f"step-{step}", exp / f"step-{step}.tmp"
        try:
            accelerator.save_state(str(tmp))
            if main_process:
                save_model_file(str(tmp / "model.pt"), accelerator.unwrap_model(encoder),
                                accelerator.unwrap_model(upstream), cfg.upstream.trainable, model_meta(cfg),
                                accelerator.unwrap_model(head))
                (tmp / "train_state.json").write_text(json.dumps(state) + "\n")
                # for report.py, which never loads a model: which upstream layers the featurizer relies on
                weights = accelerator.unwrap_model(encoder).featurizer.layer_weights()
                (tmp / "layer_weights.json").write_text(json.dumps(weights) + "\n")
                if valid is not None:
                    (tmp / "eval" / "valid").mkdir(parents=True)
                    (tmp / "eval" / "valid" / "metrics.json").write_text(json.dumps(valid, indent=2) + "\n")
        except (OSError, RuntimeError, SafetensorError) as e:  # a full disk: torch.save and safetensors raise their own
            shutil.rmtree(tmp, ignore_errors=True)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
            last = complete_checkpoints(exp)
            free = shutil.disk_usage(exp).free / 1e9
            raise OSError(f"cannot write checkpoint {final}: {reason} ({free:.1f} GB free there; last complete "
                          f"checkpoint: {last[-1] if last else 'none'})") from None
        if main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            if state["best_step"] == step:
                link = exp / "best.tmp"
                link.unlink(missing_ok=True)
                link.symlink_to(final.name)
                os.replace(link, exp / "best")
            if t.keep_num_ckpts > 0:  # the newest N, and always the best
                keep = {f"step-{state['best_step']}", final.name}
                for old in complete_checkpoints(exp)[:-t.keep_num_ckpts]:
                    if old.name not in keep:
                        shutil.rmtree(old)
        accelerator.wait_for_everyone()

    # ---- stage 2: the training loop
    log_path = exp / "train.log"
    bar = progress(total=t.total_steps, desc="training", unit="step", enabled=main_process)
    bar.update(state["step"])

    def say(line: str):
        """A log line: on the terminal (above the progress bar) and in train.log."""
        if main_process:
            bar.write(line)
            with open(log_path, "a") as f:
                f.write(line + "\n")

    encoder.train()
    head.train()
    if cfg.upstream.trainable:
        upstream.train()
    loss_sum = torch.zeros((), device=accelerator.device)  # over the kept steps since the last log line
    correct = torch.zeros((), device=accelerator.device)
    seen, kept, micro, bad_in_row, tic = 0, 0, 0, 0, time.time()
    pending = []  # (loss, correct, crops) of the step in progress: logged once it is kept, so a NaN never is
    # BatchNorm running statistics change in every forward pass, even one whose update is then skipped:
    # a skipped step puts back the ones of the last good step (else one NaN batch poisons evaluation for good)
    trained = (encoder, head, upstream) if cfg.upstream.trainable else (encoder, head)
    buffers = [b for m in trained for b in m.buffers()]
    good_buffers = [b.clone() for b in buffers]
    batches = accelerator.skip_first_batches(loader, state["micro_batches"]) if state["micro_batches"] else loader
    accelerator.print(f"training {sum(p.numel() for p in params) / 1e6:.2f}M parameters on "
                      f"{len(train_utts)} utterances of {len(label_of)} speakers; {len(sampler)} batches per epoch")
    for wavs, lengths, labels in batches:
        if state["step"] >= t.total_steps:
            break
        spec_rng.manual_seed(t.seed * 1_000_003 + state["micro_batches"] * accelerator.num_processes
                             + accelerator.process_index)
        with accelerator.accumulate(encoder, head):
            # a frozen upstream is not prepared, so Accelerate's autocast must be asked for explicitly
            with accelerator.autocast(), torch.set_grad_enabled(cfg.upstream.trainable):
                hidden, frames = upstream(wavs, lengths)  # frozen: no activations kept for backward
            loss, cosine = head(encoder(hidden, frames), labels)
            accelerator.backward(loss)
            finite = True
            if accelerator.sync_gradients:  # gradients are complete (and all-reduced) only now
                norm = accelerator.clip_grad_norm_(params, t.gradient_clipping if t.gradient_clipping > 0 else math.inf)
                finite = bool(torch.isfinite(norm))  # one sync per optimizer step; identical on every process
            if finite or accelerator.scaler is not None:  # fp16: the grad scaler skips it and lowers its scale
                optimizer.step()
            optimizer.zero_grad()
        state["micro_batches"] += 1
        pending.append((loss.detach(), (cosine.argmax(1) == labels).sum(), labels.numel()))
        seen += labels.numel()
        if not accelerator.sync_gradients:
            continue
        state["step"] += 1
        step = state["step"]
        set_lr(step)
        bar.update()
        if not finite:  # a loss spike or NaN: skip this update, stop if it keeps happening
            for b, good in zip(buffers, good_buffers):
                b.copy_(good)
            state["skipped_steps"] += 1
            bad_in_row += 1
            say(f"warning: step {step} skipped: non-finite loss or gradient "
                f"({bad_in_row} in a row, {state['skipped_steps']} in all)")
            if bad_in_row >= MAX_BAD_STEPS_IN_ROW:
                last = complete_checkpoints(exp)
                raise ValueError(f"{bad_in_row} optimizer steps in a row had a non-finite loss or gradient; "
                                 f"stopped (last good checkpoint: {last[-1] if last else 'none'}); "
                                 "check the training audio or try a lower optim.lr")
        else:
            bad_in_row = 0
            for b, good in zip(buffers, good_buffers):
                good.copy_(b)
            for step_loss, step_correct, crops in pending:
                loss_sum += step_loss
                correct += step_correct
                kept += crops
                micro += 1
        pending.clear()

        if step % t.log_step == 0 or step == t.total_steps:
            # micro and kept are equal on every process (a step is skipped everywhere or nowhere)
            loss_avg = accelerator.reduce(loss_sum, "mean").item() / micro if micro else math.nan
            acc = accelerator.reduce(correct, "sum").item() / (kept * accelerator.num_processes) if kept else math.nan
            speed = seen * accelerator.num_processes / (time.time() - tic)
            line = (f"step {step} | loss {loss_avg:.4f} | acc {acc:.3f} | lr {lr_at(step - 1, cfg):.1e} "
                    f"| {speed:.0f} crops/s")
            if state["skipped_steps"]:
                line += f" | {state['skipped_steps']} steps skipped"
            say(line)
            weights = accelerator.unwrap_model(encoder).featurizer.layer_weights()
            accelerator.log({"train/loss": loss_avg, "train/accuracy": acc, "train/lr": lr_at(step - 1, cfg),
                             "train/crops_per_second": speed, "train/skipped_steps": state["skipped_steps"],
                             **{f"layer_weights/{i:02d}": w for i, w in enumerate(weights)}}, step=step)
            loss_sum.zero_()
            correct.zero_()
            seen, kept, micro, tic = 0, 0, 0, time.time()  # (not bad_in_row: it counts across log lines)

        valid = None
        if step % t.eval_step == 0 or step == t.total_steps:
            valid = validate(step)
            if valid is not None and better(valid[t.valid_metric], state["best_metric"], cfg):
                state["best_metric"], state["best_step"] = valid[t.valid_metric], step
        if step % t.save_step == 0 or step == t.total_steps or (valid is not None and state["best_step"] == step):
            save(step, valid)
            tic = time.time()

    bar.close()
    if state["step"] < t.total_steps:
        raise ValueError(f"the data loader ended at step {state['step']} of {t.total_steps}")
    accelerator.print(f"done: {t.total_steps} steps; best validation {t.valid_metric} "
                      f"{state['best_metric']} at step {state['best_step']} ({exp / 'best'})")
    if t.test_after_train and state["best_step"] is not None:
        evaluate_checkpoints(accelerator, cfg, [exp / "best"])
    accelerator.end_training()


if __name__ == "__main__":
    main()
