"""Writing files so that a kill at any instant leaves either the old version or the new one.

Every stage writes through these three helpers: a reader never sees half a file, and a
folder that is a set of files (one evaluation's scores and metrics, one preparation's
manifests) is replaced as a whole.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path


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


def recover_dir(final: Path):
    """Undo a `replace_dir` that a kill cut short: the old folder comes back if no new one arrived."""
    final = Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)
