"""The run folder: atomic files, the lock, records (config, run.json, history), checkpoints, `best`,
pruning and averaging. Every writer here leaves a consistent folder whatever instant it is killed at."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import yaml

from .config import Config, ConfigError, config_changes, config_to_dict, load_config, unsafe_changes
from .data import read_manifest, trial_lists


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", shared: bool = False, **open_kwargs):
    """Open `path.tmp`; on a clean exit it is renamed over `path`, on an error it is removed.

    `shared`: several processes may write the same `path` at once (each its own `path.<pid>.tmp`;
    the last rename wins, and every version is complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + (f".{os.getpid()}" if shared else "") + ".tmp")
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if "b" not in mode else {}), **open_kwargs) as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text: str):
    with atomic_write(path) as f:
        f.write(text)


def save_config(cfg: Config, path):
    """Write the resolved config atomically; loading it back gives the same Config."""
    write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def write_json(path, data):
    write_text(path, json.dumps(data, indent=2) + "\n")


def replace_dir(new: Path, final: Path):
    """Put the complete folder `new` in place of `final` (which may exist).

    Two renames: `final` -> `final.old`, `new` -> `final`, then `final.old` is deleted. A kill
    between them leaves `final.old` beside no `final`; `recover_dir` puts it back.
    """
    new, final = Path(new), Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def what_is(path) -> str | None:
    """What an existing path is, by what this code writes into each kind of folder (None: nothing there)."""
    path = Path(path)
    if path.is_symlink():
        return "link"
    if not path.exists():
        return None
    if not path.is_dir():
        return "file"
    if (path / "averaged.json").is_file() and (path / "model.pt").is_file():
        return "average"
    if (path / "model.pt").is_file() or step_of(path) is not None:
        return "checkpoint"
    if (path / "metrics.json").is_file() and path.parent.name == "eval":
        return "result set"
    if (path / "config.yaml").is_file() or (path / "run.json").is_file():
        return "run folder"
    if (path / "prepare.json").is_file() or (path / "utterances.csv").is_file():
        return "preparation"
    return "folder" if any(path.iterdir()) else "empty folder"


def check_replaceable(path, kind: str):
    """The one check before anything replaces `path` as a whole (replace_dir): absent, an empty folder, or a
    `kind` this code wrote before (its `.old`, left by a kill mid-swap, counts as it). Anything else, e.g. a
    run's logs/, speakers.txt, config.yaml or a step-N checkpoint named as --average's OUT, is refused."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    found = what_is(path) if path.exists() or path.is_symlink() or not old.exists() else what_is(old)
    if found not in (None, "empty folder", kind):
        raise ValueError(f"{path}: is a {found}, not a previous {kind}; refused (it would be replaced as a whole): "
                         "choose another name")


def recover_dir(final: Path):
    """Undo a `replace_dir` that a kill cut short: the old folder comes back if no new one arrived."""
    final = Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)


STEP_NAME = re.compile(r"step-(\d+)")
HISTORY = "valid_history.jsonl"


def step_of(path) -> int | None:
    """step-1200 -> 1200; anything else (best, step-1200.tmp) -> None."""
    match = STEP_NAME.fullmatch(Path(path).name)
    return int(match[1]) if match else None


def complete_checkpoints(exp) -> list[Path]:
    """step-N folders, oldest first (half-written step-N.tmp folders never count)."""
    found = [p for p in Path(exp).glob("step-*") if step_of(p) is not None and p.is_dir()]
    return sorted(found, key=step_of)


def read_history(exp, on_bad=None) -> list[dict]:
    """The validation history, oldest first; a torn last line (a kill mid-write) is ignored.

    on_bad(path, line number, line): called for each line that is not a JSON object with an integer
    step (the report names them; training, which tears lines itself when killed, passes nothing).
    """
    path = Path(exp) / HISTORY
    if not path.is_file():
        return []
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            entries.append(entry)
        elif on_bad is not None and line.strip():
            on_bad(path, number, line)
    return sorted({e["step"]: e for e in entries}.values(), key=lambda e: e["step"])


def write_history(exp, entries: list[dict]):
    write_text(Path(exp) / HISTORY, "".join(json.dumps(e) + "\n" for e in sorted(entries, key=lambda e: e["step"])))


def record_validation(exp, step: int, result: dict):
    """Add (or replace) the history line of `step`."""
    write_history(exp, [e for e in read_history(exp) if e["step"] != step] + [{"step": step, **result}])


def truncate_history(exp, step: int):
    """A run resumed at `step` redoes what came after it: the history must not claim it already happened."""
    entries = read_history(exp)
    if any(e["step"] > step for e in entries):
        write_history(exp, [e for e in entries if e["step"] <= step])


def rank_key(entry: dict, metric: str) -> tuple:
    """Smaller is better; see the module docstring."""
    return (entry[metric], entry.get("min_dcf_0.01", 0.0), entry.get("min_dcf_0.05", 0.0),
            -entry.get("score_margin", 0.0), -entry["step"])


def best_entry(entries: list[dict], metric: str) -> dict | None:
    ranked = [e for e in entries if isinstance(e.get(metric), (int, float))]
    return min(ranked, key=lambda e: rank_key(e, metric)) if ranked else None


def point_best(exp, step: int | None):
    """exp/best -> step-N, replaced atomically (or removed when nothing is validated)."""
    link = Path(exp) / "best"
    if step is None:
        link.unlink(missing_ok=True)
        return
    point_target(exp, f"step-{step}")


def best_step(exp) -> int | None:
    link = Path(exp) / "best"
    return step_of(os.readlink(link)) if link.is_symlink() else None


def best_target(exp) -> str | None:
    """The folder name `best` points at: step-N, or FALLBACK_NAME when validation tied; None without a link."""
    link = Path(exp) / "best"
    return os.readlink(link) if link.is_symlink() else None


# When validation cannot separate the best checkpoints (two or more tie on the metric and both minDCFs, as
# every checkpoint does at EER 0% and minDCF 0 on a small validation set), `best` is the average of the
# newest FALLBACK_LAST checkpoints on disk (WeSpeaker's average_model), not whichever a score margin favours:
# on the few-utterances corpus of issue 22 the margin chose a checkpoint 1.4 points of test EER worse than
# another equally "perfect" one. CHOICE_FILE says which was chosen and why, in one line.
FALLBACK_LAST = 3
FALLBACK_NAME = f"avg-last{FALLBACK_LAST}"
CHOICE_FILE = "choice.json"


def tied_best(entries: list[dict], metric: str) -> list[dict]:
    """The entries that rank first on everything validation measures (metric, minDCF 0.01 and 0.05; not the
    score margin, which orders checkpoints that make the same decisions)."""
    best = best_entry(entries, metric)
    if best is None:
        return []
    measured = lambda e: rank_key(e, metric)[:3]  # noqa: E731
    return [e for e in entries if isinstance(e.get(metric), (int, float)) and measured(e) == measured(best)]


def settle(exp, metric: str, keep: int) -> int | None:
    """Make history, `best` and pruning agree with the checkpoints on disk; returns the best step (the best
    ranked one, also when `best` is the averaged fallback)."""
    exp = Path(exp)
    checkpoints = complete_checkpoints(exp)
    history = {e["step"]: e for e in read_history(exp)}
    missing = {}
    for ckpt in checkpoints:
        valid = ckpt / "eval" / "valid" / "metrics.json"
        if step_of(ckpt) not in history and valid.is_file():
            missing[step_of(ckpt)] = {"step": step_of(ckpt), **json.loads(valid.read_text())}
    if missing:
        write_history(exp, [*history.values(), *missing.values()])
        history.update(missing)
    on_disk = {step_of(c) for c in checkpoints}
    entries = [e for s, e in history.items() if s in on_disk]
    best = best_entry(entries, metric)
    if keep > 0:  # the newest `keep`, and always the best
        for old in checkpoints[:-keep]:
            if best is None or step_of(old) != best["step"]:
                doomed = old.with_name(old.name + ".del")  # renamed first: a half-deleted step-N never counts
                os.replace(old, doomed)
                shutil.rmtree(doomed)
    checkpoints = complete_checkpoints(exp)
    kept = {step_of(c) for c in checkpoints}
    tied = tied_best([e for e in entries if e["step"] in kept], metric)
    if len(tied) >= 2 and len(checkpoints) >= 2:
        last = checkpoints[-FALLBACK_LAST:]
        line = (f"checkpoint choice: validation cannot separate steps {', '.join(str(e['step']) for e in tied)} "
                f"({metric} {tied[0][metric]:.4g}, the same minDCFs): best is {FALLBACK_NAME}, the average of the "
                f"last {len(last)} checkpoints (steps {', '.join(str(step_of(c)) for c in last)})")
        _average_fallback(exp, last, line)
        point_target(exp, FALLBACK_NAME)
    else:
        point_best(exp, best["step"] if best else None)
        line = None if best is None else f"checkpoint choice: step {best['step']}, first on validation {metric}"
    _record_choice(exp, line)
    return best["step"] if best else None


def _average_fallback(exp: Path, last: list[Path], line: str):
    """exp/FALLBACK_NAME holds the mean of `last`, (re)built only when those checkpoints changed."""
    out = exp / FALLBACK_NAME
    recover_dir(out)
    record = out / "averaged.json"
    try:
        if json.loads(record.read_text())["steps"] == [step_of(c) for c in last]:
            return
    except (OSError, ValueError, KeyError, TypeError):
        pass
    average_checkpoints(last, out)
    write_json(out / "choice.json", {"why": line})


def _record_choice(exp: Path, line: str | None):
    """exp/choice.json {"line": ...}; the line is also appended to train.log when it changes."""
    path = exp / CHOICE_FILE
    old = None
    if path.is_file():
        try:
            old = json.loads(path.read_text()).get("line")
        except (OSError, ValueError, AttributeError):
            old = None
    if line is None:
        path.unlink(missing_ok=True)
        return
    if line != old:
        write_json(path, {"line": line})
        with open(exp / "train.log", "a", encoding="utf-8") as f:  # whole lines, appended
            f.write(line + "\n")


def point_target(exp, name: str):
    """exp/best -> `name` (a folder of the run), replaced atomically."""
    link = Path(exp) / "best"
    if link.is_symlink() and os.readlink(link) == name:
        return
    tmp = Path(exp) / "best.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(name)
    os.replace(tmp, link)


def clear_partial_saves(exp):
    """step-N.tmp folders are saves a kill interrupted (never resumed from); step-N.del, prunings it interrupted."""
    for tmp in [*Path(exp).glob("step-*.tmp"), *Path(exp).glob("step-*.del")]:
        shutil.rmtree(tmp, ignore_errors=True)


PICKLED = (".bin", ".pkl", ".pt", ".pth")  # what torch.load reads in a checkpoint folder (Accelerate's and ours)


def check_pickles(folder):
    """Refuse, before anything is loaded, a file of a checkpoint folder that torch would unpickle (Accelerate's
    optimizer.bin and random_states_N.pkl, model.pt) unless it is a torch.save zip whose pickle names only what
    a weights-only load allows (tensors, numbers, the numpy arrays of RNG states): a crafted pickle runs code.

    Accelerate loads these with weights_only=True, but skips a random-state file it cannot load without a word
    (the resume is then not exact); this check names the file instead."""
    import torch
    from accelerate.utils.other import TORCH_SAFE_GLOBALS  # the numpy globals Accelerate's own load allows

    for path in sorted(Path(folder).iterdir()):
        if path.suffix not in PICKLED or not path.is_file():
            continue
        try:
            with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            raise ValueError(f"{path}: not a file torch.save wrote ({reason}); refused unread") from None
        if unsafe:
            raise ValueError(f"{path}: its pickle calls {', '.join(sorted(unsafe))}, which loading would run; "
                             "refused unread (a crafted or foreign file, not one train_asv.py wrote)")


# ---------------------------------------------------------------------------- averaging

def average_checkpoints(ckpts: list, out) -> Path:
    """Checkpoint folders of one run -> `out`, a checkpoint folder in that run holding their mean (WeSpeaker's
    average_model): model.pt with every floating-point tensor averaged (encoder, BatchNorm running statistics
    included, the head, a trained upstream), integer ones (BatchNorm's num_batches_tracked) from the newest,
    layer_weights.json recomputed, averaged.json naming the inputs. Built beside `out`, swapped in whole."""
    import torch  # here, not above: report.py reads this module and never loads a model

    ckpts, out = [Path(c) for c in ckpts], Path(out)
    steps = [step_of(c.resolve()) for c in ckpts]
    if None not in steps:  # newest last, whatever order a shell glob gave (step-100 before step-20)
        ckpts = [c for _, c in sorted(zip(steps, ckpts), key=lambda pair: pair[0])]
    _one_run(ckpts, out)
    states = [_model_state(c) for c in ckpts]
    for c, state in zip(ckpts[1:], states[1:]):
        if state["meta"] != states[0]["meta"] or _layout(state) != _layout(states[0]):
            raise ValueError(f"{c}: another architecture than {ckpts[0]} (its model.pt holds other tensors or meta)")
    mean = {key: {name: _mean([s[key][name] for s in states]) for name in value} if key != "meta" else value
            for key, value in states[0].items()}
    weights = mean["encoder"].get("featurizer.weights")  # absent when one upstream layer passes through
    recover_dir(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(mean, tmp / "model.pt")
    write_json(tmp / "layer_weights.json", [1.0] if weights is None else torch.softmax(weights.float(), 0).tolist())
    write_json(tmp / "averaged.json", {"checkpoints": [c.name for c in ckpts],
                                       "steps": [step_of(c.resolve()) for c in ckpts]})
    replace_dir(tmp, out)
    return out


def _one_run(ckpts: list[Path], out: Path):
    """All of `ckpts` and `out` sit in one run folder, each checkpoint once; a one-line error otherwise."""
    if not ckpts:
        raise ValueError("no checkpoints to average")
    runs = {c.absolute().parent for c in ckpts}
    if len(runs) != 1:
        raise ValueError(f"checkpoints of {len(runs)} runs ({', '.join(sorted(map(str, runs)))}): average one run's")
    run = runs.pop()
    if len({c.resolve() for c in ckpts}) < len(ckpts):
        raise ValueError(f"a checkpoint is named twice in {', '.join(c.name for c in ckpts)} (best is a link to one)")
    if out.absolute().parent != run:
        raise ValueError(f"{out}: the averaged checkpoint must sit in the run folder {run}, beside its config.yaml")
    if step_of(out) is not None or out.name == "best" or out.suffix in (".tmp", ".old"):
        raise ValueError(f"{out}: training owns that name (step-N, best, .tmp, .old): choose e.g. avg-last3")
    check_replaceable(out, "average")


def _model_state(ckpt: Path) -> dict:
    """A checkpoint's model.pt as saved (encoder, meta, head, upstream state dicts), on the CPU."""
    import torch

    path = ckpt / "model.pt"
    if not path.is_file():
        raise ValueError(f"{ckpt}: not a checkpoint folder (no model.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or "encoder" not in state or "meta" not in state:
        raise ValueError(f"{path}: not a model file written by train_asv.py (no encoder weights or meta)")
    return state


def _layout(state: dict) -> dict:
    """What must agree to average: {part: {tensor name: (shape, dtype)}}."""
    return {key: {name: (tuple(t.shape), t.dtype) for name, t in value.items()}
            for key, value in state.items() if key != "meta"}


def _mean(tensors: list):
    """The mean of floating-point tensors, in float64 then cast back; integer ones (counters): the last."""
    if not tensors[0].is_floating_point():
        return tensors[-1].clone()
    return (sum(t.double() for t in tensors) / len(tensors)).to(tensors[0].dtype)


class RunLock:
    """An exclusive flock on exp/.lock for as long as the object lives (or until `release`)."""

    def __init__(self, exp: Path):
        exp.mkdir(parents=True, exist_ok=True)
        self.path = exp / ".lock"
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise ValueError(f"{exp} is in use by {holder}: wait for it to finish or stop it "
                             "(a dead process holds no lock)") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.file.flush()

    def release(self):
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def data_fingerprint(data_dir: str) -> str:
    """What training depends on in a data folder (utterance ids, speakers, splits, durations, the
    validation list), not where it lies: a moved folder has the same fingerprint."""
    h = hashlib.sha256()
    for u in sorted(read_manifest(data_dir), key=lambda u: u.id):
        h.update(f"{u.id}\t{u.speaker}\t{u.split}\t{u.duration:.4f}\n".encode())
    valid = trial_lists(data_dir).get("valid")
    if valid:
        h.update(valid.read_bytes())
    return h.hexdigest()[:16]


CONFIG_HISTORY = "config_history.jsonl"


def config_history(exp) -> list[dict]:
    path = Path(exp) / CONFIG_HISTORY
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line (a kill mid-append)
            pass
    return [e for e in entries if isinstance(e, dict)]


def record_change(exp, entry: dict):
    with open(Path(exp) / CONFIG_HISTORY, "a", encoding="utf-8") as f:  # appended whole lines only
        f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), **entry}) + "\n")


def resume_folder(exp, cfg: Config, checkpoints: list[Path]) -> Path | None:
    """What a (re-)run resumes from: train.resume_ckpt_dir until this run has saved a checkpoint after resuming
    from it (config_history.jsonl records the resume), then its newest checkpoint like any re-run."""
    source = cfg.train.resume_ckpt_dir
    if source:
        resolved = Path(source).resolve()
        done = any(e.get("resumed_from") == str(resolved) for e in config_history(exp))
        if not done or not any(step_of(c) > (step_of(resolved) or 0) for c in checkpoints):
            return Path(source)
    return checkpoints[-1] if checkpoints else None


def check_resume_source(exp: Path, cfg: Config, checkpoints: list[Path], amend: bool) -> dict | None:
    """train.resume_ckpt_dir, checked before anything is written: a step-N checkpoint; from another run, one
    trained with this config (but exp_dir); never deleting this run's later checkpoints unsaid. Either is
    refused unless --amend; returns the config_history entry recording the resume (None: nothing to resume)."""
    folder = resume_folder(exp, cfg, checkpoints)
    if folder is None or folder != Path(cfg.train.resume_ckpt_dir or "."):
        return None
    step = step_of(folder.resolve())
    if step is None or not folder.is_dir():
        raise ValueError(f"train.resume_ckpt_dir={folder}: not a step-N checkpoint folder of train_asv.py")
    source = run_folder(folder)
    entry, problems = {"at_step": step, "resumed_from": str(folder.resolve())}, []
    if source.resolve() != exp.resolve():
        try:
            theirs = load_config(str(source / "config.yaml"))
        except ConfigError as e:
            raise ValueError(f"{source / 'config.yaml'}: cannot be read back ({e})") from None
        differ = {k: v for k, v in unsafe_changes(theirs, cfg).items()
                  if k not in ("train.resume_ckpt_dir", "train.auto_resume")}
        record = source / "run.json"
        recorded = json.loads(record.read_text()).get("data_fingerprint") if record.is_file() else None
        if "data.dir" in differ and recorded == data_fingerprint(cfg.data.dir):
            del differ["data.dir"]  # the same data, moved
        if differ:
            entry["changes"] = {k: [old, new] for k, (old, new) in differ.items()}
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in differ.items())
            problems.append(f"its run {source} was trained with another config ({listed})")
    later = [c.name for c in checkpoints if step_of(c) > step]
    if later:
        entry["deleted"] = later
        problems.append(f"resuming at step {step} deletes this run's later checkpoints {', '.join(later)}")
    if problems and not amend:
        raise ValueError(f"train.resume_ckpt_dir={folder}: {'; '.join(problems)}. Re-run with --amend to do it on "
                         "purpose (recorded in config_history.jsonl)")
    entry["amended"] = bool(problems)
    return entry


def open_run(exp: Path, cfg: Config, amend: bool) -> list[Path]:
    """Create the run folder, or check a re-run against it; returns its complete checkpoints.

    Call with the RunLock held, on the main process only. Nothing is written before every check passed.
    """
    checkpoints = complete_checkpoints(exp)
    saved_path = exp / "config.yaml"
    fingerprint = data_fingerprint(cfg.data.dir)
    if not saved_path.is_file():
        if checkpoints:
            raise ValueError(f"{exp} holds checkpoints but no config.yaml: not a run folder this code wrote; "
                             "use a new exp_dir")
        resumed = check_resume_source(exp, cfg, checkpoints, amend)
        save_config(cfg, saved_path)
        write_json(exp / "run.json", {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "data_fingerprint": fingerprint})
        if resumed:
            record_change(exp, resumed)
        return checkpoints
    if checkpoints and not cfg.train.auto_resume and not cfg.train.resume_ckpt_dir:
        raise ValueError(f"{exp} holds checkpoints of an earlier run (up to {checkpoints[-1].name}) and "
                         "train.auto_resume=false: use a new exp_dir, or delete that folder to start over")
    try:
        saved = load_config(str(saved_path))
    except ConfigError as e:
        raise ValueError(f"{saved_path}: cannot be read back ({e}); use a new exp_dir") from None
    refused = unsafe_changes(saved, cfg)
    run = json.loads((exp / "run.json").read_text()) if (exp / "run.json").is_file() else {}
    recorded = run.get("data_fingerprint")
    if "data.dir" in refused and recorded == fingerprint:
        del refused["data.dir"]  # the same data, moved
    other_data = {"data fingerprint": (recorded, fingerprint)} if recorded and recorded != fingerprint else {}
    if "data.dir" not in refused:
        refused.update(other_data)  # the same folder, prepared again with other contents
    if refused and not amend and checkpoints:  # with no checkpoint, nothing was trained with the old config
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ValueError(f"{exp} was trained with another config ({listed}). Use a new exp_dir, or re-run with "
                         "--amend to change the run on purpose (recorded in config_history.jsonl)")
    resumed = check_resume_source(exp, cfg, checkpoints, amend)
    changes = {**config_changes(saved, cfg), **other_data}
    if changes:
        step = step_of(checkpoints[-1]) if checkpoints else 0
        entry = {"at_step": step, "amended": bool(refused) and bool(checkpoints)}
        if refused and not checkpoints:  # a first start that stopped before its first checkpoint: a fresh start
            entry["before_any_checkpoint"] = True
            for derived in ("speakers.txt", "durations_after_effects.txt", HISTORY):  # of the old config's data
                (exp / derived).unlink(missing_ok=True)
        record_change(exp, {**entry, "changes": {k: [old, new] for k, (old, new) in changes.items()}})
        save_config(cfg, saved_path)
        write_json(exp / "run.json", {**run, "data_fingerprint": fingerprint})
    if resumed:
        record_change(exp, resumed)
    return checkpoints


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder for `path`, or a one-line ValueError naming the cause: no such folder (with the
    folder it was looked for in), a pruned checkpoint, a dangling `best`, a run folder without `best`, a folder
    that is neither. A run folder (config.yaml, no model.pt) stands for its `best`, the one it unambiguously has."""
    folder = Path(path)
    run = folder.absolute().parent
    if not folder.exists() and not folder.is_symlink():
        step = step_of(folder)
        if step is not None and (run / "config.yaml").is_file():
            if any(e["step"] == step for e in read_history(run)):
                on_disk = ", ".join(c.name for c in complete_checkpoints(run)) or "none"
                raise ValueError(f"{folder}: pruned (train.keep_num_ckpts keeps the newest checkpoints and best; "
                                 f"its validation line is in {run / HISTORY}); on disk: {on_disk}")
        raise ValueError(f"{folder}: no such folder (looked for {folder.absolute()}; a relative path is read from "
                         f"the current folder, {Path.cwd()})")
    if folder.is_symlink() and not folder.exists():
        raise ValueError(f"{folder}: points at {os.readlink(folder)}, which is gone (pruned or deleted by hand)")
    if (folder / "model.pt").is_file():
        return folder
    if (folder / "config.yaml").is_file():
        best = folder / "best"
        if best.is_symlink() and not best.exists():
            raise ValueError(f"{folder}: a run folder whose best points at {os.readlink(best)}, which is gone")
        if not best.exists():
            on_disk = ", ".join(c.name for c in complete_checkpoints(folder))
            raise ValueError(f"{folder}: a run folder with no `best` checkpoint yet (nothing validated): give one "
                             f"of its checkpoints instead" + (f" ({on_disk})" if on_disk else " (none on disk)"))
        return best
    raise ValueError(f"{folder}: not a checkpoint folder (no model.pt) nor a run folder (no config.yaml)")


# What an evaluation may override on top of the run's config.yaml; the rest (optim, loss, augment, the architecture,
# train.* but mixed_precision) is training's: it changes nothing an evaluation does, or breaks the checkpoint.
EVAL_KEYS = ("num_workers", "eval_batch", "data.dir", "data.shards", "data.sample_rate", "data.eval_batch_secs",
             "data.eval_chunk_secs", "upstream.ckpt", "train.mixed_precision", "score")
# Overrides that leave every cosine score as the run's config gives it: an embedding never depends on its
# batch-mates; a shard store holds the very bytes of the files (tests/test_shards.py); data.dir may only name
# the same data (its fingerprint is checked); score.* adds AS-norm results, which record their cohort settings.
# The others give results of their own (eval/<list>@<hash>/).
SAME_RESULTS = ("num_workers", "data.eval_batch_secs", "data.dir", "data.shards", "score")


def record_launch(exp: Path, processes: int, global_batch: int, workers: int) -> dict:
    """Keep in run.json how the run is launched now (process count, utterances per optimizer step, loader
    workers per process as num_workers resolved); returns what was recorded before ({} for a new run).
    Main process only."""
    path = exp / "run.json"
    run = json.loads(path.read_text()) if path.is_file() else {}
    before = {k: run[k] for k in ("processes", "global_batch") if k in run}
    write_json(path, {**run, "processes": processes, "global_batch": global_batch, "num_workers": workers})
    return before


def run_folder(ckpt_or_run: Path) -> Path:
    """The run folder a checkpoint (or run folder) belongs to: where its config.yaml is."""
    folder = Path(ckpt_or_run)
    run = folder if (folder / "config.yaml").is_file() else folder.absolute().parent
    if not (run / "config.yaml").is_file():
        raise ValueError(f"{folder}: no config.yaml here or in {run}: not a run or checkpoint folder of train_asv.py")
    return run


def run_config(ckpt_or_run: Path, overrides: list[str] = ()) -> Config:
    """The config of the run a checkpoint (or run folder) belongs to, with overrides for evaluation."""
    run = run_folder(ckpt_or_run)
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if not any(key == k or key.startswith(k + ".") for k in EVAL_KEYS):
            raise ValueError(f"override '{text}': {key} is a training key, which an evaluation never reads; "
                             f"evaluation takes {', '.join(EVAL_KEYS)} (score.*)")
    return load_config(str(run / "config.yaml"), overrides)


def eval_overrides(ckpt: Path, cfg: Config) -> dict:
    """{dotted key: value} of `cfg` that differ from the run's recorded config and change results: an evaluation
    with any writes its own result set (eval/<list>@<hash>/), never the run's recorded one."""
    changes = config_changes(run_config(ckpt), cfg)
    return {k: new for k, (_, new) in sorted(changes.items())
            if not any(k == same or k.startswith(same + ".") for same in SAME_RESULTS)}
