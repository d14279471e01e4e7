"""Trackers through config (TensorBoard out of the box) and progress bars that stay out of logs."""
import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from conftest import REPO as ROOT
from test_faults import make_corpus

QUICK = ["train.log_step=5", "train.eval_step=10", "train.save_step=10", "num_workers=0", "data.batch_size=16",
         "train.total_steps=10", "train.test_after_train=false"]


def train_cmd(data, exp, *overrides):
    return [sys.executable, "train_asv.py", "--config", "configs/demo.yaml", f"data.dir={data}", f"exp_dir={exp}",
            *QUICK, *overrides]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A tiny prepared corpus (12 tone speakers, 2 of them for validation)."""
    return make_corpus(tmp_path_factory.mktemp("tracking"))


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Each scalar tag's (step, value) events as TensorBoard shows them: per run folder, all its event files read
    in order, so that a restart's purge (SummaryWriter's purge_step) drops what it replaces."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for folder in sorted({events.parent for events in log_dir.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(folder))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return found


def test_tensorboard_by_default_logs_what_the_log_prints(demo, tmp_path):
    exp = tmp_path / "exp"
    out = subprocess.run(train_cmd(demo, exp), cwd=ROOT, capture_output=True, text=True, check=True)
    logged = scalars(exp / "logs")
    for tag in ("train/loss", "train/accuracy", "train/lr", "valid/eer", "valid/min_dcf_0.01", "layer_weights/00"):
        assert tag in logged, (tag, sorted(logged))
    assert [s for s, _ in logged["train/loss"]] == [5, 10]
    assert logged["train/lr"][0][1] == pytest.approx(1e-3)
    # the validation EER in TensorBoard is the one printed in the log
    printed = [line for line in out.stdout.splitlines() if line.startswith("step 10 | valid EER")][0]
    assert f"{logged['valid/eer'][0][1]:.2f}%" in printed
    # progress bars stay out of non-interactive output
    assert "\r" not in out.stdout + out.stderr and "it/s" not in out.stderr


def test_layer_weights_of_a_multi_layer_upstream_are_logged(demo, tmp_path):
    exp = tmp_path / "exp"
    subprocess.run(train_cmd(demo, exp, "upstream.name=wavlm_base", "upstream.n_mels=80", "upstream.random_init=true",
                             "upstream.arch={encoder_num_layers: 2, encoder_embed_dim: 32, encoder_num_heads: 2, "
                             "encoder_ff_interm_features: 64, encoder_pos_conv_kernel: 8, encoder_pos_conv_groups: 2, extractor_conv_layer_config: [[32, 10, 5], [32, 3, 2], "
                             "[32, 3, 2], [32, 3, 2], [32, 3, 2], [32, 2, 2], [32, 2, 2]]}",
                             "downstream.proj_dim=32", "downstream.channels=32", "downstream.stats_dim=64",
                             "downstream.embed_dim=32", "train.total_steps=5", "train.eval_step=5"),
                   cwd=ROOT, capture_output=True, text=True, check=True)
    logged = scalars(exp / "logs")
    weights = sorted(tag for tag in logged if tag.startswith("layer_weights/"))
    assert weights == ["layer_weights/00", "layer_weights/01", "layer_weights/02"]  # CNN output + 2 layers
    # tolerance: logged float32 weights, each rounded: the sum is 1 within a few u
    assert sum(logged[tag][-1][1] for tag in weights) == pytest.approx(1.0, abs=1e-5)


def test_no_tracker_and_tracker_errors(demo, tmp_path):
    subprocess.run(train_cmd(demo, tmp_path / "none", "train.log_with=none", "train.total_steps=5"),
                   cwd=ROOT, capture_output=True, check=True)
    assert not (tmp_path / "none" / "logs").exists()
    typo = subprocess.run(train_cmd(demo, tmp_path / "typo", "train.log_with=tensorbord"), cwd=ROOT,
                          capture_output=True, text=True)
    assert typo.returncode != 0
    assert typo.stderr.strip().splitlines()[-1] == (
        "error: train.log_with: unknown tracker 'tensorbord' (did you mean 'tensorboard'?)")


def test_progress_bar_on_an_interactive_terminal(demo, tmp_path):
    """On a terminal, training shows a bar with steps and ETA; the log lines still come through."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen(train_cmd(demo, tmp_path / "tty", "train.log_with=none"), cwd=ROOT, stdin=child,
                            stdout=child, stderr=child)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=300) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "training:" in text and "/10 [" in text and "<" in text  # "5/10 [00:02<00:02, ...]"
    assert "step 10 | valid EER" in text
    assert (tmp_path / "tty" / "train.log").read_text().count("valid EER") == 1


def test_a_resume_leaves_one_event_per_step_in_tensorboard(demo, tmp_path):
    """Killed after logging steps 3 and 4 but before step-4 was complete: the resume from step-2 redoes steps 3 and
    4, and TensorBoard must show each once (the redone values), not the interrupted run's as well."""
    exp = tmp_path / "exp"
    steps = ["train.log_step=1", "train.save_step=2", "train.eval_step=2", "train.total_steps=4"]
    subprocess.run(train_cmd(demo, exp, *steps), cwd=ROOT, capture_output=True, check=True)
    os.rename(exp / "step-4", exp / "step-4.tmp")  # what a kill during step 4's save leaves
    subprocess.run(train_cmd(demo, exp, *steps), cwd=ROOT, capture_output=True, check=True)
    assert len(list((exp / "logs" / "exp").glob("events.out.tfevents.*"))) == 2  # both runs logged
    logged = scalars(exp / "logs")
    for tag in ("train/loss", "train/lr", "layer_weights/00"):
        assert [s for s, _ in logged[tag]] == [1, 2, 3, 4], (tag, logged[tag])
    assert [s for s, _ in logged["valid/eer"]] == [2, 4]
    log = (exp / "train.log").read_text()  # train.log keeps both, the redone steps below the resume mark
    assert log.count("step 4 | loss") == 2 and log.index("--- resumed from") > log.index("step 4 | loss")
