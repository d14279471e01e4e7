"""Train a speaker-verification model: label encoder (stage 1), then training (stage 2).

    accelerate launch train_asv.py --config configs/base.yaml
    python train_asv.py --config configs/demo.yaml train.total_steps=200 exp_dir=exp/try

Re-running the same command resumes from the newest complete checkpoint in exp_dir; a re-run
with another config is refused unless --amend (asv/run.py). Checkpoints: exp_dir/step-N/
(Accelerate state + model.pt, the file evaluation loads); exp_dir/best -> the checkpoint ranked
first on the validation speakers (the test trials never choose anything). At the end the best
checkpoint is evaluated on the test trial lists.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from safetensors import SafetensorError

from asv.config import flatten, help_text, load_config
from asv.data import (compute_effects, loader_workers, open_store, read_effects, read_manifest, read_trials,
                      train_loader, trial_lists, trims_of, write_effects)
from asv.embed import (check_both_kinds, embed, eval_loader, evaluate_checkpoints, load_extractors, meta_of,
                       resolve_lists, score_trials, scores_text, trial_audio, trial_rows, unscored, validation_metrics)
from asv.models import load_model_file, min_input_samples, save_model_file
from asv.run import (RunLock, best_entry, check_pickles, clear_partial_saves, complete_checkpoints, open_run, rank_key,
                     read_history, record_change, record_launch, record_validation, resume_folder, settle,
                     truncate_history, write_json, write_text)
from asv.train import (FROZEN_FILE, Log, NonFiniteGuard, StepMeter, TrainState, build_parts, check_resume,
                       frozen_fingerprint, global_batch, label_encoder, lr_at, make_accelerator, one_line, prepare, rate,
                       register_lean_state, set_schedules, train_step)


def main():
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=__doc__, epilog=help_text(), formatter_class=Formatter)
    parser.add_argument("--config", help="YAML config (none: every key at its default below)")
    parser.add_argument("--amend", action="store_true",
                        help="accept a config that differs from the run folder's (recorded in config_history.jsonl)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.total_steps=200 optim.lr=1e-3")
    args = parser.parse_args()
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, args.amend)
    except (ValueError, OSError) as e:  # ConfigError and AudioError are ValueErrors; OSError: a full disk
        sys.exit(f"error: {one_line(e)}")
    except KeyboardInterrupt:  # one line instead of a traceback, and what to do next
        last = complete_checkpoints(Path(cfg.exp_dir)) if cfg else []
        sys.exit(f"interrupted: re-run the same command to resume from {last[-1]}" if last else
                 "interrupted before the first checkpoint: re-run the same command to start again")


def absolute_paths(cfg):
    """Paths in the config as absolute ones, so config.yaml means the same from any directory."""
    for section, key in (("", "exp_dir"), ("data", "dir"), ("upstream", "ckpt"), ("augment", "noise_dir"),
                         ("augment", "rir_dir"), ("train", "init_from"), ("train", "resume_ckpt_dir")):
        owner = getattr(cfg, section) if section else cfg
        if getattr(owner, key):
            setattr(owner, key, os.path.abspath(getattr(owner, key)))
    if cfg.data.shards and "://" not in cfg.data.shards:  # a URL stays as it is
        cfg.data.shards = os.path.abspath(cfg.data.shards)
    return cfg


def build_data(accelerator, cfg, exp: Path):
    """Stage 1 (labels) and the training loader; the main process writes, the others read after it."""
    d = cfg.data
    utts = read_manifest(d.dir)
    train_utts = [u for u in utts if u.split == "train"]
    if not train_utts:
        raise ValueError(f"{d.dir}/utterances.csv has no training utterances")
    if accelerator.is_main_process:
        label_encoder(exp, [u.speaker for u in train_utts])
    accelerator.wait_for_everyone()
    label_of = label_encoder(exp, [u.speaker for u in train_utts])
    store = open_store(cfg)  # checked against the data folder before any work
    trims = effects_of(accelerator, cfg, train_utts, store) if d.effects == "superb" else None
    durations = [u.duration for u in train_utts] if trims is None else list(trims.kept / d.sample_rate)
    if d.crop == "superb":  # s3prl drops utterances of at most min_secs
        kept = [i for i, s in enumerate(durations) if s > d.min_secs]
        if len(kept) < len(train_utts):
            accelerator.print(f"{len(train_utts) - len(kept)} of {len(train_utts)} training utterances are "
                              f"{d.min_secs:g} s or shorter{' after the effects' if d.effects != 'none' else ''}: "
                              "left out, as SUPERB does")
        train_utts, durations = [train_utts[i] for i in kept], [durations[i] for i in kept]
        trims = trims.take(kept) if trims is not None else None
    loader = train_loader(cfg, train_utts, [label_of[u.speaker] for u in train_utts], durations,
                          multiple=cfg.train.gradient_accumulate * accelerator.num_processes, trims=trims, store=store)
    num_classes = len(label_of) * (3 if cfg.augment.speed_prob > 0 else 1)  # speed-perturbed copies are new speakers
    return loader, num_classes, (f"{len(train_utts)} utterances of {len(label_of)} speakers; "
                                 f"{len(loader.batch_sampler)} batches per epoch")


def effects_of(accelerator, cfg, train_utts, store=None):
    """The training files' SUPERB effects from the data folder's effects.tsv (prepare_voxceleb.py writes it).
    What it lacks (an older data folder, files changed since) is computed here once, every process taking
    an equal share (so none waits long for another), and the main process writes it back: the next run
    on this data reads it. From a shard store, its rows must match the files the store was written from."""
    d = cfg.data
    rows, missing = read_effects(d.dir, train_utts, d.sample_rate, store.keys() if store else None)
    if store and missing:
        raise ValueError(f"{d.dir}/effects.tsv lacks {len(missing)} training files of the shard store {d.shards} "
                         f"(e.g. {missing[0].path}), or they changed since: run prepare_voxceleb.py on the files "
                         "first (it writes effects.tsv), then --shards, or train with data.effects=none")
    # every process computes its share of what any of them lacks, so all agree on the work
    todo = sorted({u.path: u for u in gather_object(missing)}.values(), key=lambda u: u.path) \
        if accelerator.num_processes > 1 else missing
    if todo:
        accelerator.print(f"{d.dir}/effects.tsv lacks {len(todo)} of {len(train_utts)} training files (or they "
                          f"changed): trimming them once, {accelerator.num_processes} process(es) sharing the work")
        share = todo[accelerator.process_index::accelerator.num_processes]
        done = compute_effects(d.dir, share, d.sample_rate, cfg.num_workers, tag=f"rank{accelerator.process_index}",
                               show_progress=accelerator.is_main_process)
        rows.update(gather_object(list(done.items())) if accelerator.num_processes > 1 else done)
        if accelerator.is_main_process:
            write_effects(d.dir, rows, d.sample_rate)
    return trims_of(d.dir, train_utts, rows)


class Validation:
    """Validation EER / minDCF of the encoder on the data folder's valid list (validation speakers only)."""

    def __init__(self, accelerator, cfg, min_samples: int):
        self.accelerator, self.cfg, self.scores = accelerator, cfg, ""
        lists = trial_lists(cfg.data.dir)
        self.enabled = "valid" in lists
        if not self.enabled:
            accelerator.print(f"note: {cfg.data.dir}/trials/valid.txt is absent (prepared with --valid-speakers 0): "
                              "no validation and no `best`; pick checkpoints with report.py --protocol superb")
            return
        utts = read_manifest(cfg.data.dir)
        self.path, self.trials = lists["valid"], read_trials(lists["valid"])
        check_both_kinds(self.path, self.trials)  # before training, not at the first validation
        audio = trial_audio(self.trials, lists["valid"], {u.id: u for u in utts})
        self.paths = sorted(set(audio.values()))
        self.rows = trial_rows({p: i for i, p in enumerate(self.paths)}, self.trials, audio)
        durations = {u.path: u.duration for u in utts}
        self.loader = eval_loader(self.paths, [durations[p] for p in self.paths], cfg, min_samples,
                                  accelerator.device, open_store(cfg))

    def due(self, step: int) -> bool:
        t = self.cfg.train
        return self.enabled and (step % t.eval_step == 0 or step == t.total_steps)

    def __call__(self, upstream, encoder, step: int, log: Log) -> dict | None:
        cfg = self.cfg
        (table,), done = embed(self.accelerator, [upstream], [encoder], self.loader, len(self.paths), cfg.eval_batch,
                               int(cfg.data.eval_chunk_secs * cfg.data.sample_rate))
        scores, keep = score_trials(table, done, *self.rows)
        problem = unscored(self.path, self.trials, keep, done, cfg.eval_batch)
        if problem:  # eval_batch left too few files: no metric, never the best; the run goes on
            log.say(f"warning: step {step} validation skipped: {problem}")
            return None
        bad = np.count_nonzero(~np.isfinite(scores))
        if bad:  # NaN/inf embeddings (a diverged model, a broken validation file): no metric, never the best
            log.say(f"warning: step {step} validation skipped: {bad} of {len(scores)} trial scores are NaN or inf")
            return None
        result = validation_metrics(scores, self.trials.labels[keep])
        self.scores = scores_text(self.trials, keep, scores)  # saved with the checkpoint: calibration is fit on it
        log.say(f"step {step} | valid EER {result['eer']:.2f}% | minDCF0.01 {result['min_dcf_0.01']:.4f} "
                f"| minDCF0.05 {result['min_dcf_0.05']:.4f}")
        self.accelerator.log({f"valid/{k}": v for k, v in result.items()}, step=step)
        return result


def save_checkpoint(accelerator, cfg, state: TrainState, upstream, encoder, head, valid: dict | None,
                    valid_scores: str):
    """Every process saves its part into step-N.tmp; once all are in, the main process adds the train state
    (JSON), renames the folder to step-N, records the validation and settles `best` and pruning (asv/run.py)."""
    step = state.step
    exp = Path(cfg.exp_dir)
    final, tmp = exp / f"step-{step}", exp / f"step-{step}.tmp"
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every rank's RNG state is in the folder before it is renamed
        if accelerator.is_main_process:
            up, enc = accelerator.unwrap_model(upstream), accelerator.unwrap_model(encoder)
            save_model_file(str(tmp / "model.pt"), enc, up, cfg.upstream.trainable, meta_of(cfg, up),
                            accelerator.unwrap_model(head))
            # for report.py, which never loads a model: which upstream layers the featurizer relies on
            write_json(tmp / "layer_weights.json", enc.featurizer.layer_weights())
            # what the Accelerate state leaves out (the frozen upstream, frozen parameters): a resume checks it
            write_json(tmp / FROZEN_FILE, frozen_fingerprint(accelerator, cfg, encoder, head, upstream))
            state.processes = accelerator.num_processes
            state.save(tmp)
            if valid is not None:
                write_json(tmp / "eval" / "valid" / "metrics.json", valid)
                write_text(tmp / "eval" / "valid" / "scores.txt", valid_scores)
    except (OSError, RuntimeError, SafetensorError) as e:  # a full disk: torch.save and safetensors raise their own
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
        last = complete_checkpoints(exp)
        raise OSError(f"cannot write checkpoint {final}: {reason} ({shutil.disk_usage(exp).free / 1e9:.1f} GB free "
                      f"there; last complete checkpoint: {last[-1] if last else 'none'})") from None
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if valid is not None:
            record_validation(exp, step, valid)
        settle(exp, cfg.train.valid_metric, cfg.train.keep_num_ckpts)
    accelerator.wait_for_everyone()


def resume(accelerator, cfg, checkpoints: list[Path], state: TrainState, parts):
    """Load the newest complete checkpoint (or train.resume_ckpt_dir) into the prepared objects. Its state may
    leave frozen parameters out (register_lean_state): they are the ones this run rebuilt, checked first."""
    t, exp = cfg.train, Path(cfg.exp_dir)
    folder = resume_folder(exp, cfg, checkpoints)
    if folder is None:
        return
    check_pickles(folder)  # nothing is unpickled before every file of the folder is known to hold only data
    if accelerator.is_main_process:
        migrate_train_state(folder)
    accelerator.wait_for_everyone()
    lean = check_resume(accelerator, cfg, parts, folder)
    try:
        accelerator.load_state(str(folder), **({"strict": False} if lean else {}))
    except Exception as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ValueError(f"{folder}: cannot resume from it ({first})") from None
    state.load(folder)
    if accelerator.is_main_process:  # what came after the resume point is redone: its records go
        truncate_history(exp, state.step)
        later = [c for c in complete_checkpoints(exp) if int(c.name[5:]) > state.step]
        for c in later:  # open_run refused this unless --amend (train.resume_ckpt_dir) or a kill left them
            shutil.rmtree(c)
        if later:
            accelerator.print(f"deleted {', '.join(c.name for c in later)}: their steps are redone from "
                              f"step {state.step}")
        settle(exp, t.valid_metric, t.keep_num_ckpts)
    accelerator.wait_for_everyone()
    accelerator.print(f"resumed from {folder} at step {state.step}")
    return folder


def record_resume(accelerator, cfg, folder: Path, state: TrainState, log: Log):
    """train.log marks the resume point (its lines for later steps are of the interrupted run; the redone steps
    follow), and a resume under another process count, which changes the global batch, is recorded."""
    exp, before, now = Path(cfg.exp_dir), state.processes, accelerator.num_processes
    log.say(f"--- resumed from {folder} at step {state.step}: lines above for later steps are of the interrupted "
            f"run, redone below ({now} process(es)) ---")
    if before and before != now and accelerator.is_main_process:
        per_step = cfg.data.batch_size * cfg.train.gradient_accumulate
        change = {"processes": [before, now], "global_batch": [per_step * before, per_step * now]}
        log.say(f"note: the run trained with {before} process(es) up to step {state.step}, now {now}: the global "
                f"batch changes from {per_step * before} to {per_step * now} utterances per step "
                "(recorded in config_history.jsonl)")
        record_change(exp, {"at_step": state.step, "amended": False, "changes": change})
        run = json.loads((exp / "run.json").read_text()) if (exp / "run.json").is_file() else {}
        write_json(exp / "run.json", {**run, "processes": now})


def migrate_train_state(folder: Path):
    """A checkpoint of an earlier version holds the train state as Accelerate's custom_checkpoint_0.pkl, which
    Accelerate unpickles with weights_only=False: read it weights-only (three integers) into train_state.json."""
    old = folder / "custom_checkpoint_0.pkl"
    if not old.is_file():
        return
    if not (folder / TrainState.FILE).is_file():
        try:
            saved = torch.load(old, map_location="cpu", weights_only=True)
            state = TrainState()
            state.load_state_dict({k: saved[k] for k in ("step", "micro_batches", "skipped_steps")})
        except Exception as e:
            raise ValueError(f"{old}: not a train state ({' '.join(str(e).split())[:200]})") from None
        state.save(folder)
    old.unlink()


def open_run_folder(accelerator, cfg, amend: bool):
    """Lock the run folder, check the config against it and repair what a kill left half done
    (main process); every process then sees the same complete checkpoints."""
    t, exp = cfg.train, Path(cfg.exp_dir)
    lock = RunLock(exp) if accelerator.is_main_process else None  # before anything in exp is touched
    if accelerator.is_main_process:
        open_run(exp, cfg, amend)
        n, batch = accelerator.num_processes, global_batch(cfg, accelerator.num_processes)
        before = record_launch(exp, n, batch, loader_workers(cfg.num_workers))
        if before and before.get("global_batch") != batch:  # a resume on another process count
            accelerator.print(f"note: this run was trained with {before.get('processes')} process(es), "
                              f"{before.get('global_batch')} utterances per optimizer step; it goes on with {n}, {batch}")
        clear_partial_saves(exp)
        settle(exp, t.valid_metric, t.keep_num_ckpts)
    accelerator.wait_for_everyone()
    return lock, complete_checkpoints(exp) if t.auto_resume or t.resume_ckpt_dir else []


def build_run(accelerator, cfg, checkpoints: list[Path]):
    """Data, the parts (models, head, optimizer), one `prepare`, then the resume."""
    t = cfg.train
    loader, num_classes, about = build_data(accelerator, cfg, Path(cfg.exp_dir))
    parts = build_parts(cfg, num_classes)
    if t.init_from and not checkpoints:  # fine-tuning starts from another run's weights
        load_model_file(t.init_from, parts.encoder, parts.upstream, meta_of(cfg, parts.upstream), parts.head)
        accelerator.print(f"initialised from {t.init_from}")
    validation = Validation(accelerator, cfg, min_input_samples(parts.upstream, parts.encoder))
    if validation.enabled:  # prepared too: each process embeds its share, on its device
        loader, validation.loader = prepare(accelerator, parts, loader, validation.loader)
    else:
        (loader,) = prepare(accelerator, parts, loader)
    register_lean_state(accelerator, cfg)
    state = TrainState()  # saved and loaded as JSON beside Accelerate's state (never registered: a pickle)
    resumed = resume(accelerator, cfg, checkpoints, state, parts)
    return parts, loader, validation, state, about, resumed


def log_progress(accelerator, cfg, parts, state, meter: StepMeter, log: Log, step: int, crops_per_second: float):
    loss, acc = meter.read(accelerator)
    lr = lr_at(step - 1, cfg.optim.lr, cfg.scheduler, cfg.train.total_steps)
    skipped = f" | {state.skipped_steps} steps skipped" if state.skipped_steps else ""
    log.say(f"step {step} | loss {loss:.4f} | acc {acc:.3f} | lr {lr:.1e} | {rate(crops_per_second)} crops/s{skipped}")
    weights = accelerator.unwrap_model(parts.encoder).featurizer.layer_weights()
    accelerator.log({"train/loss": loss, "train/accuracy": acc, "train/lr": lr,
                     "train/crops_per_second": crops_per_second, "train/skipped_steps": state.skipped_steps,
                     **{f"layer_weights/{i:02d}": w for i, w in enumerate(weights)}}, step=step)


def train(cfg, amend: bool = False):
    cfg, t = absolute_paths(cfg), cfg.train
    exp = Path(cfg.exp_dir)
    accelerator = make_accelerator(cfg, exp)
    lock, checkpoints = open_run_folder(accelerator, cfg, amend)
    set_seed(t.seed)
    parts, loader, validation, state, about, resumed = build_run(accelerator, cfg, checkpoints)
    # once the resume point is known: TensorBoard drops the events an interrupted run logged after it (a
    # SessionLog START at purge_step), so the redone steps are shown once, not twice
    accelerator.init_trackers(exp.name, config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                for k, v in flatten(cfg).items()},
                              init_kwargs={"tensorboard": {"purge_step": state.step + 1}})
    set_schedules(accelerator, cfg, parts, state.step)
    log = Log(accelerator, exp, t.total_steps, state.step)
    if resumed:
        record_resume(accelerator, cfg, resumed, state, log)
    guard, meter = NonFiniteGuard(parts.trained), StepMeter(accelerator.device)
    for m in parts.trained:
        m.train()
    batches = accelerator.skip_first_batches(loader, state.micro_batches) if state.micro_batches else loader
    accelerator.print(f"training {sum(p.numel() for p in parts.params) / 1e6:.2f}M parameters on {about}; "
                      f"{accelerator.num_processes} process(es), {torch.get_num_threads()} threads and "
                      f"{loader_workers(cfg.num_workers)} loader workers each; global batch "
                      f"{cfg.data.batch_size} x {t.gradient_accumulate} x {accelerator.num_processes} = "
                      f"{global_batch(cfg, accelerator.num_processes)} utterances per optimizer step")
    seen, tic = 0, time.time()
    for wavs, lengths, labels in batches:  # ---- stage 2: the training loop
        if state.step >= t.total_steps:
            break
        # -- forward, backward, step (SpecAugment draws from (seed, position), like the crops)
        position = t.seed * 1_000_003 + state.micro_batches * accelerator.num_processes + accelerator.process_index
        parts.spec_rng.manual_seed(position)
        if parts.trainable_upstream:  # its dropout draws from the global RNG, which a resume's loader iterator
            torch.manual_seed(position + 1)  # also draws from: seeded by position too, a resume continues exactly
        loss, logits, finite = train_step(accelerator, parts, wavs, lengths, labels, t.gradient_clipping)
        state.micro_batches += 1
        meter.add(loss, logits, labels)
        seen += labels.numel()
        if not accelerator.sync_gradients:
            continue
        state.step += 1
        step = state.step
        set_schedules(accelerator, cfg, parts, step)
        log.bar.update()
        # -- skip a non-finite step: no update was made; put back the BatchNorm statistics of the last good one
        if finite:
            guard.commit()
            meter.commit()
        else:
            meter.drop()
            state.skipped_steps += 1
            log.say(f"warning: step {step} skipped: non-finite loss or gradient "
                    f"({guard.in_row + 1} in a row, {state.skipped_steps} in all)")
            guard.rollback(step, str((complete_checkpoints(exp) or ["none"])[-1]))
        # -- log
        if step % t.log_step == 0 or step == t.total_steps:
            log_progress(accelerator, cfg, parts, state, meter, log, step,
                         seen * accelerator.num_processes / (time.time() - tic))
            seen, tic = 0, time.time()
        # -- validate, save (a checkpoint every save_step, and whenever validation improves)
        valid = validation(parts.upstream, parts.encoder, step, log) if validation.due(step) else None
        best = best_entry(read_history(exp), t.valid_metric) if valid else None
        improved = valid is not None and (best is None or rank_key({"step": step, **valid}, t.valid_metric)
                                          < rank_key(best, t.valid_metric))
        if step % t.save_step == 0 or step == t.total_steps or improved:
            save_checkpoint(accelerator, cfg, state, parts.upstream, parts.encoder, parts.head, valid, validation.scores)
            tic = time.time()
    log.bar.close()
    if state.step < t.total_steps:
        raise ValueError(f"the data loader ended at step {state.step} of {t.total_steps}")
    finish(accelerator, cfg, exp)
    if lock:
        lock.release()


def finish(accelerator, cfg, exp: Path):
    """The test lists: the best checkpoint's results, or every checkpoint's without validation (SUPERB's stage 3)."""
    t = cfg.train
    best = best_entry(read_history(exp), t.valid_metric)
    if best:
        accelerator.print(f"done: {t.total_steps} steps; best validation {t.valid_metric} {best[t.valid_metric]:.4g} "
                          f"at step {best['step']} ({exp / 'best'})")
    if not t.test_after_train:
        accelerator.end_training()
        return
    ckpts = [exp / "best"] if best else complete_checkpoints(exp)
    lists = resolve_lists(cfg.data.dir, [])
    if lists and ckpts:
        locks = lock_checkpoints(accelerator, ckpts)
        ex = load_extractors(ckpts)
        evaluate_checkpoints(accelerator, ex, lists)
        for lock in locks:
            lock.release()
    accelerator.end_training()


def lock_checkpoints(accelerator, ckpts: list[Path]) -> list[RunLock]:
    """The lock evaluate_asv.py takes on each checkpoint it writes results into (main process): an evaluation of
    the same checkpoint running meanwhile refuses the test evaluation, on every process alike, naming its holder."""
    locks, refused = [], None
    if accelerator.is_main_process:
        try:
            for c in ckpts:
                locks.append(RunLock(c.resolve()))
        except ValueError as e:
            refused = str(e)
            for lock in locks:
                lock.release()
    if accelerator.num_processes > 1:
        refused = broadcast_object_list([refused])[0]
    if refused:
        raise ValueError(f"{refused}; training is complete, evaluate its test lists later with "
                         f"evaluate_asv.py --ckpt-dir {' '.join(map(str, ckpts))}")
    return locks


if __name__ == "__main__":
    main()
