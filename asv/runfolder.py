"""A run folder whose record is true: one process at a time, a config fixed when the run is created.

    exp/<run>/config.yaml          the resolved config the checkpoints were trained with
    exp/<run>/run.json             when the run was created, and a fingerprint of its training data
    exp/<run>/config_history.jsonl every accepted change: when, at which step, old and new values
    exp/<run>/.lock                held (flock) by the training process; the kernel drops it when it dies

A re-run is compared with config.yaml before anything is written. Keys that do not change what
the weights are (logging, the number of steps, workers, ...: config.SAFE_TO_CHANGE) may change
and are recorded. Any other change is refused with the keys listed, unless asked for with
--amend, and then recorded too. A moved data folder (data.dir differs, same fingerprint) is fine.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from pathlib import Path

from .checkpoints import complete_checkpoints, step_of
from .config import Config, ConfigError, config_changes, load_config, save_config, unsafe_changes
from .data import read_manifest, trial_lists
from .fileio import write_json


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
        save_config(cfg, saved_path)
        write_json(exp / "run.json", {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "data_fingerprint": fingerprint})
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
    if refused and not amend:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ValueError(f"{exp} was trained with another config ({listed}). Use a new exp_dir, or re-run with "
                         "--amend to change the run on purpose (recorded in config_history.jsonl)")
    changes = {**config_changes(saved, cfg), **other_data}
    if changes:
        step = step_of(checkpoints[-1]) if checkpoints else 0
        entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "at_step": step, "amended": bool(refused),
                 "changes": {k: [old, new] for k, (old, new) in changes.items()}}
        with open(exp / "config_history.jsonl", "a", encoding="utf-8") as f:  # appended whole lines only
            f.write(json.dumps(entry) + "\n")
        save_config(cfg, saved_path)
        write_json(exp / "run.json", {**run, "data_fingerprint": fingerprint})
    return checkpoints


def run_config(ckpt_or_run: Path, overrides: list[str] = ()) -> Config:
    """The config of the run a checkpoint (or run folder) belongs to, with overrides for evaluation."""
    folder = Path(ckpt_or_run)
    run = folder if (folder / "config.yaml").is_file() else folder.absolute().parent
    if not (run / "config.yaml").is_file():
        raise ValueError(f"{folder}: no config.yaml here or in {run}: not a run or checkpoint folder of train_asv.py")
    return load_config(str(run / "config.yaml"), overrides)
