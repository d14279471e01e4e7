"""Hostile files: every file a resume or an evaluation loads, replaced by one whose load would run code (a pickle
calling os.system to write a marker file, a YAML tag, an object array). The marker never appears and the
command stops with one line naming the file.

One tiny run (2 steps, one checkpoint) per module; each test damages a copy of it.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from test_faults import STEPS, assert_one_line_error, copy_run, evaluate, train, trained_run


class Boom:
    """Unpickling this runs `touch marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = trained_run(tmp_path_factory.mktemp("hostile").resolve())
    assert (root / "exp" / "step-2" / "train_state.json").is_file()
    return root


@pytest.fixture
def copy(trained, tmp_path) -> Path:
    return copy_run(trained, tmp_path / "exp")


def plant(path: Path, marker: Path):
    """`path` replaced by a torch.save file whose pickle calls os.system (as a crafted download would)."""
    path.unlink(missing_ok=True)
    torch.save({"state": Boom(marker)}, path)


def resume(trained, exp):
    return train(trained / "data", exp, "train.total_steps=4", *STEPS, check=False)


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "model.pt"])
def test_a_resume_runs_no_code_from_a_checkpoint_file(trained, copy, tmp_path, name):
    """custom_checkpoint_0.pkl is what Accelerate unpickles with weights_only=False when a train state is
    registered with it; the others it loads weights-only but skips a bad random state without a word."""
    marker = tmp_path / "marker"
    plant(copy / "step-2" / name, marker)
    result = resume(trained, copy)
    assert not marker.exists()
    assert_one_line_error(result, f"{copy}/step-2/{name}", "posix.system", "refused unread")
    assert (copy / "step-2").is_dir() and not (copy / "step-4").exists()


def test_resume_ckpt_dir_of_another_run_is_checked_the_same(trained, copy, tmp_path):
    other = copy / "step-2"  # a run of this very config (but exp_dir): accepted as a source, then checked
    marker = tmp_path / "marker"
    plant(other / "custom_checkpoint_0.pkl", marker)
    result = train(trained / "data", tmp_path / "new", "train.total_steps=4", *STEPS, f"train.resume_ckpt_dir={other}",
                   check=False)
    assert not marker.exists()
    assert_one_line_error(result, f"{other}/custom_checkpoint_0.pkl")


@pytest.mark.parametrize("text", ['{"step": "__import__(\'os\')"}', '{"step": 2}', "[2, 2, 0]", "not json"])
def test_a_train_state_that_is_not_three_counters_is_one_line(trained, copy, text):
    (copy / "step-2" / "train_state.json").write_text(text)
    assert_one_line_error(resume(trained, copy), f"{copy}/step-2/train_state.json")


def test_an_earlier_versions_pickled_train_state_is_read_weights_only(trained, copy):
    """A checkpoint written before train_state.json: its custom_checkpoint_0.pkl of three integers still resumes."""
    ckpt = copy / "step-2"
    state = json.loads((ckpt / "train_state.json").read_text())
    torch.save(state, ckpt / "custom_checkpoint_0.pkl")
    (ckpt / "train_state.json").unlink()
    result = resume(trained, copy)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and "at step 2" in result.stdout
    assert json.loads((copy / "step-4" / "train_state.json").read_text())["step"] == 4
    assert not (ckpt / "custom_checkpoint_0.pkl").exists()


# ---------------------------------------------------------------- what evaluation reads

def test_evaluation_runs_no_code_from_model_pt(copy, tmp_path):
    marker = tmp_path / "marker"
    plant(copy / "step-2" / "model.pt", marker)
    result = evaluate(copy / "step-2")
    assert not marker.exists()
    assert_one_line_error(result, f"{copy}/step-2/model.pt")


def test_evaluation_runs_no_code_from_config_yaml(copy, tmp_path):
    marker = tmp_path / "marker"
    config = copy / "config.yaml"
    config.write_text(f"!!python/object/apply:os.system [touch {marker}]\n" + config.read_text())
    result = evaluate(copy / "step-2")
    assert not marker.exists()
    assert_one_line_error(result, str(config))


@pytest.mark.parametrize("text", ['{"__class__": "os.system", "args": ["touch marker"]}', "{not json", "[1, 2]"])
def test_a_calibration_that_is_not_two_numbers_is_one_line(copy, text):
    path = copy / "step-2" / "calibration.json"
    path.write_text(text)
    assert_one_line_error(evaluate(copy / "step-2"), str(path))


def test_a_feature_cache_entry_holding_a_pickle_is_never_unpickled(copy, tmp_path):
    """A cache entry is an .npz file; one holding a pickled object array would run code under allow_pickle=True."""
    cache = tmp_path / "cache"
    first = evaluate(copy / "step-2", "--feature-cache", cache)
    assert first.returncode == 0, first.stderr
    entry = sorted(cache.glob("*/*/*.npz"))[0]
    marker = tmp_path / "marker"
    arr = np.empty(1, dtype=object)
    arr[0] = Boom(marker)
    with open(entry, "wb") as f:
        np.save(f, arr, allow_pickle=True)
    result = evaluate(copy / "step-2", "--feature-cache", cache)
    assert not marker.exists()
    assert result.returncode == 0, result.stderr  # the bad entry is named, recomputed, and evaluation goes on
    assert str(entry) in result.stdout + result.stderr


def test_an_enrolled_speakers_file_holding_a_pickle_is_never_unpickled(copy, tmp_path):
    """The API's load_enrolled reads an .npz that save_enrolled wrote; one whose speakers are a pickled object array
    (as a crafted file would be) is refused, naming the file, without running anything."""
    import asv
    marker = tmp_path / "marker"
    speakers = np.empty(1, dtype=object)
    speakers[0] = Boom(marker)
    path = tmp_path / "enrolled.npz"
    np.savez(path, speakers=speakers, embeddings=np.zeros((1, 4), np.float32), weights=np.array("x"))
    model = asv.load(copy / "step-2")
    with pytest.raises(ValueError, match=f"^{path}: not a file save_enrolled wrote") as e:
        model.load_enrolled(path)
    assert "\n" not in str(e.value) and not marker.exists() and not model.enrolled
